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


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


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
    """The typed path as an existing image file; ValueError with what to do otherwise."""
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} could not be read as an image (damaged, cut short, or not a picture): upload a "
                         "complete JPEG, PNG or WebP, or type its path.") from error


def describe_file(path: Path) -> str:
    """'name: W x H px, N MB', read from the file's header only (fast on big photos)."""
    try:
        with Image.open(path) as picture:
            width, height = picture.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return f"{path.name}: not an image Pillow can read"
    return f"{path.name}: {width} x {height} px, {megabytes(path.stat().st_size)}"


def describe_upload(entry: dict) -> str:
    """'name: W x H px, N MB' for an uploaded file, from its header."""
    content = bytes(entry["content"])
    try:
        with Image.open(io.BytesIO(content)) as picture:
            width, height = picture.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return f"{upload_name(entry)}: not an image Pillow can read"
    return f"{upload_name(entry)}: {width} x {height} px, {megabytes(len(content))}"


def oversize_message(name: str, size: int) -> str:
    return (f"{name} is {megabytes(size)}, over Jupyter's {megabytes(UPLOAD_LIMIT_BYTES)} upload limit, so it was not "
            f"uploaded and the image below is unchanged. {UPLOAD_FIX}")


def upload_guard_script(button_class: str, note_class: str) -> str:
    """Browser code that refuses files over UPLOAD_LIMIT_BYTES before ipywidgets sends them.

    ipywidgets' FileUpload opens a detached <input type=file> from its button's click handler. Wrapping
    HTMLInputElement.click lets the guard add, to that input only, a capturing change listener that runs before
    the widget's: an oversize file is dropped there and the UI's note element (`note_class`, found next to the
    button inside the same `.nbh-seg-ui` container) says so. Installed once per page.
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
        if (!big) { return; }
        event.stopImmediatePropagation();
        this.value = "";
        const note = root && root.querySelector("." + settings.note);
        const mb = (big.size / 1048576).toFixed(1) + " MB";
        const text = settings.template.replace("NAME is 0.0 MB", big.name + " is " + mb);
        if (note) { note.textContent = text; note.style.color = "#c00"; } else { window.alert(text); }
      }, true);
    }
    return originalClick.apply(this, arguments);
  };
})(%s);""" % settings
