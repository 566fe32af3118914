"""What the segmentation UI reads: a typed path or an uploaded file, each checked with a message for a UI user.

No widgets here: plain functions on strings, paths and the upload widget's value, plus the browser-side guard
that stops uploads Jupyter Server would drop.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image, UnidentifiedImageError

from nbhelpers.seg.inputs import IMAGE_EXTENSIONS, list_image_files, load_image

# Jupyter Server drops websocket messages over tornado's default websocket_max_message_size (10 MiB), and an
# upload travels as one message; 64 KiB stay free for the message's header.
UPLOAD_LIMIT_BYTES = 10 * 2**20 - 64 * 2**10
UPLOAD_FIX = ("Type the file's path in the path box instead (on Kaggle or Colab, first copy the file to the notebook's "
              "disk, e.g. with the file browser's upload), or start Jupyter with a larger limit: "
              "--ServerApp.tornado_settings=\"{'websocket_max_message_size': 104857600}\".")


# What Pillow raises for a file that is not a (complete) image.
_NOT_AN_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def file_size(size: int) -> str:
    """A file size in the unit that reads at a glance: '800 bytes', '42 KB', '3.4 MB'."""
    if size < 1024:
        return f"{size} bytes"
    return f"{size / 1024:.0f} KB" if size < 2**20 else megabytes(size)


def clean_path(text: str) -> str:
    """A path as typed or pasted -> a plain path: outer quotes, file:// URLs and ~ are accepted."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # "Copy as path" and shells add quotes
        text = text[1:-1].strip()
    if text.lower().startswith("file:"):
        url = urlparse(text)
        text = url2pathname(unquote(url.path)) if url.netloc in ("", "localhost") else text
    return str(Path(text).expanduser()) if text else ""


def check_image_path(text: str) -> Path:
    """The typed path as an existing file (not yet read: see `describe_file`); ValueError with what to do otherwise."""
    cleaned = clean_path(text)
    if not cleaned:
        raise ValueError("No image: upload one or type its path.")
    path = Path(cleaned)
    if path.is_dir():
        images = list_image_files(path)
        example = f", e.g. {images[0]}" if images else f" (none of {', '.join(IMAGE_EXTENSIONS)} found in it)"
        raise ValueError(f"{path} is a folder: type the path of one image in it{example}. "
                         "To segment a whole folder, set IMAGE_PATH in the notebook's parameters cell.")
    if not path.is_file():
        raise ValueError(f"No file at {path}: check the spelling, or copy the path from the file browser "
                         "(right-click, Copy Path).")
    return path


def upload_entries(value: Any) -> list[dict]:
    """The upload widget's files, oldest first (ipywidgets 7 gives a dict, 8 a tuple)."""
    return list(value.values()) if isinstance(value, dict) else list(value)


def upload_name(entry: dict) -> str:
    return entry.get("name") or entry.get("metadata", {}).get("name", "upload")


def decode_upload(entry: dict) -> np.ndarray:
    """An uploaded file as (H, W, 3) uint8 RGB (EXIF, alpha and 16-bit handled by `load_image`)."""
    name = upload_name(entry)
    try:
        with Image.open(io.BytesIO(bytes(entry["content"]))) as picture:
            picture.load()  # decode now, so a truncated upload fails here with its name
            return load_image(picture)
    except _NOT_AN_IMAGE as error:
        raise ValueError(f"{name} could not be read as an image (damaged, cut short, or not a picture): upload a "
                         "complete JPEG, PNG or WebP, or type its path.") from error


def image_problem(path: Path, error: Exception) -> str:
    """What is wrong with an image file that Pillow could not read, and what to do, in a user's words."""
    if isinstance(error, Image.DecompressionBombError):
        return (f"{path.name} has more pixels than Pillow opens by default ({error}): downscale it, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS in the notebook.")
    types = ", ".join(IMAGE_EXTENSIONS)
    if isinstance(error, UnidentifiedImageError):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return f"{path.name} is not an image, although its name ends in {path.suffix}: check that it is the right file."
        kind = f"{path.suffix} files are" if path.suffix else "a file without an extension is"
        return f"{path.name} is not an image ({kind} not supported): type the path of an image file ({types})."
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (f"{path.name} is damaged or cut short ({detail}): re-export or re-download it as a complete image "
            f"({types}).")


def describe_file(path: Path) -> str:
    """'name: W x H px, 42 KB' once the whole file has been decoded, so a file cut short is reported when its path
    is entered, not at Segment. ValueError (from `image_problem`) for a file that is not a readable image."""
    try:
        with Image.open(path) as picture:
            width, height = picture.size
            picture.draft("RGB", (1, 1))  # a JPEG decodes at 1/8 scale: every byte is still read, 3x faster
            picture.load()
    except _NOT_AN_IMAGE as error:
        raise ValueError(image_problem(path, error)) from error
    return f"{path.name}: {width} x {height} px, {file_size(path.stat().st_size)}"


def read_image_file(path: Path) -> np.ndarray:
    """The image file as (H, W, 3) uint8 RGB (EXIF, alpha and 16-bit handled by `load_image`); ValueError from
    `image_problem` for a file that is not a readable image."""
    try:
        with Image.open(path) as picture:
            picture.load()
            return load_image(picture)
    except _NOT_AN_IMAGE as error:
        raise ValueError(image_problem(path, error)) from error


def describe_upload(entry: dict) -> str:
    """'name: W x H px, 42 KB' for an uploaded file, from its header."""
    content = bytes(entry["content"])
    try:
        with Image.open(io.BytesIO(content)) as picture:
            width, height = picture.size
    except _NOT_AN_IMAGE:
        return f"{upload_name(entry)}: not an image Pillow can read"
    return f"{upload_name(entry)}: {width} x {height} px, {file_size(len(content))}"


def oversize_message(name: str, size: int) -> str:
    return (f"{name} is {megabytes(size)}, over Jupyter's {megabytes(UPLOAD_LIMIT_BYTES)} upload limit, so it was not "
            f"uploaded and the image below is unchanged. {UPLOAD_FIX}")


def upload_guard_script(button_class: str, note_class: str) -> str:
    """Browser code that refuses files over UPLOAD_LIMIT_BYTES before ipywidgets sends them.

    ipywidgets' FileUpload opens a detached <input type=file> from its button's click handler. Wrapping
    HTMLInputElement.click lets the guard add, to that input only, a capturing change listener that runs before
    the widget's: an oversize file is dropped there and the UI's note element (`note_class`, found next to the
    button inside the same `.nbh-seg-ui` container) says so. The refusal is written inside the note's content
    element, which ipywidgets redraws whenever the kernel changes the note, and the next accepted file puts the
    note back at once. Installed once per page.
    """
    settings = json.dumps({"limit": UPLOAD_LIMIT_BYTES, "button": button_class, "note": note_class,
                           "template": oversize_message("NAME", 0)})
    return """(function (settings) {
  if (window.nbhUploadGuard) { return; }
  window.nbhUploadGuard = settings;
  let armed = null;
  document.addEventListener("click", function (event) {
    const button = event.target.closest && event.target.closest("." + settings.button);
    armed = button || null;
    if (button) { setTimeout(function () { armed = null; }, 0); }
  }, true);
  const originalClick = HTMLInputElement.prototype.click;
  HTMLInputElement.prototype.click = function () {
    if (armed && this.type === "file" && !this.nbhGuarded) {
      this.nbhGuarded = true;
      const root = armed.closest(".nbh-seg-ui");
      this.addEventListener("change", function (event) {
        const big = Array.from(this.files || []).find(function (file) { return file.size > settings.limit; });
        const note = root && root.querySelector("." + settings.note);
        const content = note && (note.querySelector(".widget-html-content") || note);
        if (!big) {
          if (content && content.nbhHint !== undefined) { content.innerHTML = content.nbhHint; delete content.nbhHint; }
          return;
        }
        event.stopImmediatePropagation();
        this.value = "";
        const mb = (big.size / 1048576).toFixed(1) + " MB";
        const text = settings.template.replace("NAME is 0.0 MB", big.name + " is " + mb);
        if (!content) { window.alert(text); return; }
        if (content.nbhHint === undefined) { content.nbhHint = content.innerHTML; }
        const refusal = document.createElement("span");
        refusal.style.color = "#c00";
        refusal.textContent = text;
        content.replaceChildren(refusal);
      }, true);
    }
    return originalClick.apply(this, arguments);
  };
})(%s);""" % settings
