"""Image loading (any mode, EXIF orientation) and prompt handling for the segmentation pipeline."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

# What PIL raises for files that are not (complete) images.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")  # a GIF only if it is one frame


# ----------------------------------------------------------------------------- image loading


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Grayscale / RGB / RGBA array of any common dtype -> (H, W, 3) uint8 RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"image array has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):  # floats in [0, 1] (or already 0..255)
        scale = 255.0 if np.nanmax(array) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale + 0.5, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:  # 16-bit (and 32-bit "I" images holding 16-bit data): full range -> 0..255
        array = (np.clip(array.astype(np.float32), 0, 65535) / 257.0 + 0.5).astype(np.uint8)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:  # composite on white: transparent areas become white, not black
        alpha = array[:, :, 3:].astype(np.float32) / 255.0
        return (array[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)  # phone photos store rotation as an EXIF tag
    if image.mode in ("RGB", "L", "RGBA") or image.mode.startswith("I") or image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:  # P, PA, LA, La, RGBa
        return _array_to_rgb(np.asarray(image.convert("RGBA")))
    return _array_to_rgb(np.asarray(image.convert("RGB")))  # CMYK, YCbCr, LAB, HSV, 1, P


def load_image(source: str | os.PathLike | np.ndarray | Image.Image) -> np.ndarray:
    """Read an image file (or take an array / PIL image) as RGB uint8.

    Handles grayscale, RGBA (composited on white), 16-bit (scaled to 8-bit), CMYK and palette images, and
    applies the EXIF orientation.
    Args:
        source: file path, numpy array (H, W[, C]) or PIL image.
    Returns:
        (H, W, 3) uint8 RGB array.
    Raises:
        FileNotFoundError: the file does not exist. ValueError: it is not a readable image.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {str(path)!r} (check the path; folders are listed with segment_images)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not later
            return _pil_to_rgb(image)
    except _UNREADABLE as error:
        raise unreadable_image_error(path, error) from error


def unreadable_image_error(path: Path, error: Exception) -> ValueError:
    return ValueError(
        f"cannot read image {str(path)!r}: {error}. Re-export or re-download it as a complete PNG/JPEG "
        f"(for a very large photo: downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS)."
    )


def is_animated(path: str | os.PathLike) -> bool:
    """True for an image file with several frames (an animated GIF, WebP, TIFF): it is a video, not an image.

    An unreadable file counts as not animated (loading it as an image then reports the problem).
    """
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (by extension; animated GIFs are videos), sorted by name."""
    return sorted(path for path in Path(folder).iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
                  and not (path.suffix.lower() == ".gif" and is_animated(path)))


def find_unreadable_images(source: str | os.PathLike) -> list[tuple[str, ValueError]]:
    """Check every image of `source` (an image file, or a folder's images) before any model is loaded.

    PIL reads each header and `verify()` walks the file's structure without decoding pixels, so this costs little
    next to a model load; a file whose pixel data alone is damaged is still caught (and skipped) when it is decoded.
    Returns:
        (file name, ValueError naming the file and the fix) for each unreadable image; [] when all are fine.
    Raises:
        FileNotFoundError: `source` does not exist. ValueError: a folder without image files.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image not found: {str(path)!r} (give an image file or a folder of images)")
    files = list_image_files(path) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no images in folder {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    unreadable = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.verify()
        except _UNREADABLE as error:
            unreadable.append((file.name, unreadable_image_error(file, error)))
    return unreadable


# ----------------------------------------------------------------------------- prompts


def prompt_phrases(prompt: str | Sequence[str]) -> list[str]:
    """Split a prompt into lower-case, unique phrases: "Cat, a dog." or ["cat", "a dog"] -> ["cat", "a dog"]."""
    parts = [prompt] if isinstance(prompt, str) else list(prompt)
    phrases = []
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"prompt items must be strings, got {type(part).__name__}")
        phrases += [" ".join(piece.split()).lower() for piece in re.split(r"[.,;\n]", part)]
    phrases = list(dict.fromkeys(phrase for phrase in phrases if phrase))  # drop empties and repeats, keep order
    if not phrases:
        raise ValueError(f"PROMPT {prompt!r} is empty: name at least one object, e.g. 'a cat. a remote control'.")
    return phrases


def normalize_prompt(prompt: str | Sequence[str]) -> str:
    """GroundingDINO's prompt format: lower case, each phrase ending in '. ' -> "cat. dog."."""
    return ". ".join(prompt_phrases(prompt)) + "."


@dataclass(frozen=True)
class TextLimit:
    """How much text one model reads (nbhelpers.seg.models.text_token_limit gives max_tokens)."""

    model: str  # named in the warning, e.g. "GroundingDINO"
    tokenizer: Any  # the model's transformers tokenizer
    max_tokens: int  # most tokens it reads, special tokens included
    joined: bool = False  # True: all phrases form one prompt "a. b." (GroundingDINO); False: each phrase is a text

    def fits(self, phrases: list[str]) -> bool:
        texts = [normalize_prompt(phrases)] if self.joined else phrases
        # verbose=False: no "Token indices sequence length is longer" warning while measuring
        return all(len(self.tokenizer(text, verbose=False)["input_ids"]) <= self.max_tokens for text in texts)


def _most_that_fit(items: list, fits: Callable[[list], bool]) -> int:
    """The largest k such that fits(items[:k]), by bisection (a prefix of a fitting prefix fits too)."""
    low, high = 0, len(items)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(items[:middle]) else (low, middle - 1)
    return low


def _leading_part(phrase: str, limit: TextLimit) -> str:
    """The phrase's leading words that `limit` reads whole; a single word too long for it: its leading tokens."""
    words = phrase.split()
    count = _most_that_fit(words, lambda part: not part or limit.fits([" ".join(part)]))
    if count:
        return " ".join(words[:count])
    ids = limit.tokenizer(words[0], add_special_tokens=False, verbose=False)["input_ids"]

    def decode(part: list[int]) -> str:
        return limit.tokenizer.decode(part, skip_special_tokens=True).strip()

    count = _most_that_fit(ids, lambda part: not part or (bool(decode(part)) and limit.fits([decode(part)])))
    return decode(ids[:count])


def _fit_one(phrases: list[str], limit: TextLimit) -> list[str]:
    """Phrases within one limit: each phrase cut to it, or (joined) trailing phrases dropped, then the first cut."""
    if limit.fits(phrases):
        return phrases
    if not limit.joined:
        return [phrase if limit.fits([phrase]) else _leading_part(phrase, limit) for phrase in phrases]
    kept = phrases[: _most_that_fit(phrases, lambda part: not part or limit.fits(part))]
    return kept or [_leading_part(phrases[0], limit)]


def fit_phrases(phrases: list[str], limits: Sequence[TextLimit]) -> list[str]:
    """Cut the phrases so that every model reads all of its text; one warning line when anything is cut.

    Args:
        phrases: from `prompt_phrases`. limits: one per model that reads them (per-phrase limits apply first).
    Returns:
        The phrases every model reads whole (at least the leading part of the first one), without repeats.
    """
    fitted, cutting = list(phrases), []
    for limit in sorted(limits, key=lambda limit: limit.joined):
        before, fitted = fitted, [phrase for phrase in _fit_one(fitted, limit) if phrase]
        if fitted != before:
            cutting.append(f"{limit.model} {limit.max_tokens} tokens{' in all' if limit.joined else ' per phrase'}")
    fitted = list(dict.fromkeys(fitted))
    if not fitted:  # no token of the prompt survives decoding (not seen with real tokenizers)
        raise ValueError(f"PROMPT {normalize_prompt(phrases)[:80]!r}...: no part of it fits the models' text "
                         f"encoders; use short phrases such as 'a cat. a remote control'.")
    if cutting:
        shown = normalize_prompt(fitted)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        # a plain line (not warnings.warn, which would show this file's path and line), written above any progress bar
        tqdm.write(f"warning: prompt cut to what the models read ({', '.join(cutting)}): using {shown!r}. Shorten "
                   f"the prompt or split it into several runs.", file=sys.stderr)
    return fitted
