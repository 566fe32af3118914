"""Segment still images: an image, a list or a folder -> one Segmentation each, batch by batch.

Loading and batching live here; the models run behind a `SegmentationBackend` (nbhelpers.seg.backends), so this
module does not know which model family produced a result.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from nbhelpers.platform import progress_bar
from nbhelpers.seg.backends import SegmentationBackend, as_backend
from nbhelpers.seg.inputs import IMAGE_EXTENSIONS, list_image_files, load_image, prompt_phrases
from nbhelpers.seg.models import SegmentationModels
from nbhelpers.seg.types import DEFAULT_BATCH_SIZE, DetectionSettings, Segmentation

Models = SegmentationModels | SegmentationBackend  # loaded models (GroundingDINO, SAM 2.1, CLIPSeg) or any backend


def _named_sources(images) -> list[tuple[str, object]]:
    """(display name, path or array) for a folder, one file, one array/PIL image, or a list of them."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images).expanduser()
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                raise ValueError(f"no images in folder {str(path)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
            return [(file.name, file) for file in files]
        return [(path.name, path)]
    if isinstance(images, (np.ndarray, Image.Image)):
        return [("image_0", images)]
    return [(Path(item).name if isinstance(item, (str, os.PathLike)) else f"image_{index}", item)
            for index, item in enumerate(images)]


def iter_segmentations(images: str | os.PathLike | np.ndarray | Iterable, prompt: str | Sequence[str], models: Models,
                       settings: DetectionSettings = DetectionSettings(), batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                       on_unreadable: Callable[[str, Exception], None] | None = None, profile: bool = False
                       ) -> Iterator[tuple[str, np.ndarray, Segmentation]]:
    """Like `segment_images`, but yields (name, image RGB, Segmentation) batch by batch (bounded memory).

    Args:
        on_unreadable: called with (name, error) for a missing or corrupt file, which is then skipped;
            None = raise the FileNotFoundError / ValueError.
        Others as in `segment_images`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backend = as_backend(models)
    phrases = backend.fit_phrases(prompt_phrases(prompt))
    sources = _named_sources(images)
    with progress_bar(total=len(sources), desc="segment", unit="image", disable=not progress) as bar:
        for first in range(0, len(sources), batch_size):
            batch = []
            for name, source in sources[first : first + batch_size]:
                try:
                    batch.append((name, load_image(source)))
                except (FileNotFoundError, ValueError) as error:
                    if on_unreadable is None:
                        raise
                    on_unreadable(name, error)
            arrays = [array for _, array in batch]
            results = backend.segment_images(arrays, phrases, settings, profile=profile) if batch else []
            bar.update(len(sources[first : first + batch_size]))
            for (name, image), segmentation in zip(batch, results):
                yield name, image, segmentation


def segment_images(images: str | os.PathLike | np.ndarray | Iterable, prompt: str | Sequence[str], models: Models,
                   settings: DetectionSettings = DetectionSettings(), batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
                   skip_unreadable: bool = False, profile: bool = False) -> list[tuple[str, Segmentation]]:
    """Segment every image of a folder or list with one prompt (batched detection and SAM encoder).

    Args:
        images: a folder, an image path, an array/PIL image, or a list of paths/arrays.
        prompt, models, settings: as in `segment_image`.
        batch_size: images per forward pass. progress: show a tqdm bar.
        skip_unreadable: warn and go on past missing/corrupt files instead of raising.
        profile: synchronise the GPU after each stage so `Segmentation.timings` splits exactly (slower);
            by default the timings are host-side and queued GPU work may count in a later stage.
    Returns:
        [(source name, Segmentation)] in input order (file name for paths, "image_<i>" for arrays).
        All masks stay in memory: for large folders iterate `iter_segmentations` instead.
    """
    def warn(name: str, error: Exception) -> None:
        warnings.warn(f"skipped {name}: {error}", stacklevel=4)

    return [(name, segmentation) for name, _, segmentation in iter_segmentations(
        images, prompt, models, settings, batch_size=batch_size, progress=progress,
        on_unreadable=warn if skip_unreadable else None, profile=profile)]


def segment_image(image: str | os.PathLike | np.ndarray | Image.Image, prompt: str | Sequence[str], models: Models,
                  settings: DetectionSettings = DetectionSettings()) -> Segmentation:
    """Find the prompt's objects in one image and segment them.

    Args:
        image: path, (H, W[, C]) array or PIL image.
        prompt: "a cat. a remote", "cat, dog" or ["cat", "dog"].
        models: from nbhelpers.seg.models.load_models, or any SegmentationBackend.
        settings: thresholds, NMS overlap, box cap and multimask (DetectionSettings; its defaults when omitted).
    Returns:
        Segmentation at the original resolution; source "none" and a message when nothing matched.
    """
    return segment_images([image], prompt, models, settings, batch_size=1, progress=False)[0][1]
