"""Image loading (any mode, EXIF orientation) and prompt handling for the segmentation pipeline."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Sequence

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


def fit_phrases(phrases: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Drop trailing phrases (or words) until the prompt fits the text encoder; warn when anything is cut.

    Args:
        phrases: from `prompt_phrases`. tokenizer: the text encoder's (a transformers tokenizer).
        max_tokens: most tokens the encoder reads, special tokens included.
    Returns:
        The leading phrases that fit (at least the first phrase's leading words).
    """
    def token_count(candidate: list[str]) -> int:
        # tokenize() does not warn about over-long inputs the way __call__ does
        return len(tokenizer.tokenize(normalize_prompt(candidate))) + tokenizer.num_special_tokens_to_add()

    if token_count(phrases) <= max_tokens:
        return phrases
    kept: list[str] = []
    for phrase in phrases:
        if token_count(kept + [phrase]) > max_tokens:
            break
        kept.append(phrase)
    if not kept:  # the first phrase alone is too long: keep its leading words
        words = phrases[0].split()
        while len(words) > 1 and token_count([" ".join(words)]) > max_tokens:
            words.pop()
        kept = [" ".join(words)]
    # a plain line (not warnings.warn, which would show this file's path and line), written above any progress bar
    tqdm.write(f"warning: prompt has {token_count(phrases)} tokens, more than GroundingDINO reads ({max_tokens}); "
               f"using {normalize_prompt(kept)!r}. Shorten the prompt or split it into several runs.", file=sys.stderr)
    return kept
