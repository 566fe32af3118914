"""Text prompt -> GroundingDINO boxes -> SAM 2.1 masks on still images, with a CLIPSeg fallback."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms
from tqdm.auto import tqdm

from nbhelpers.seg.inference import (Detections, clipseg_probabilities, grounding_dino_inputs, max_prompt_tokens,
                                     run_grounding_dino, sam2_image_embeddings, sam2_masks_for_boxes,
                                     sam2_pixel_values)
from nbhelpers.seg.inputs import (IMAGE_EXTENSIONS, _fit_phrases, list_image_files, load_image, normalize_prompt,
                                  prompt_phrases)
from nbhelpers.seg.models import SegmentationModels

# Segmentation.timings keys, in seconds. Batched stages are shared equally among the images of a batch.
TIMING_STAGES = {
    "preprocess": "PIL conversion plus the GroundingDINO and SAM processors (resize, normalise, tokenise), to device",
    "detect": "GroundingDINO forward pass and box post-processing",
    "segment": "SAM image encoder, then its mask decoder on the boxes and upsampling to the image size",
    "fallback": "CLIPSeg (its preprocessing included) and SAM refinement of its regions; 0 when not needed",
    "total": "sum of the stages above",
}


@dataclass
class Segmentation:
    """Result for one image; everything at the original image resolution."""

    boxes: np.ndarray  # (N, 4) float32, xyxy in original-image pixels
    scores: np.ndarray  # (N,) float32 detection scores (CLIPSeg fallback: mean probability inside the region)
    labels: list[str]  # (N,) phrases matched to each box
    masks: np.ndarray  # (N, H, W) bool
    mask_scores: np.ndarray  # (N,) float32 SAM predicted IoU (fallback without SAM refinement: NaN)
    source: str  # "grounding-dino" | "clipseg-fallback" | "none"
    image_size: tuple[int, int]  # (H, W) of the original image
    prompt: str  # normalised prompt, e.g. "cat. dog."
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, keys: TIMING_STAGES
    message: str = ""  # human-readable note (e.g. why nothing was found)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, image_size: tuple[int, int], prompt: str, message: str, timings: dict[str, float] | None = None) -> "Segmentation":
        height, width = image_size
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], np.zeros((0, height, width), bool),
            np.zeros(0, np.float32), "none", image_size, prompt, timings or {}, message,
        )

    def summary(self) -> str:
        """One line: how many objects of which label, from which stage."""
        counts = {label: self.labels.count(label) for label in dict.fromkeys(self.labels)}
        found = ", ".join(f"{count}x {label!r}" for label, count in counts.items()) or "nothing"
        return f"{found} ({self.source}, {self.timings.get('total', 0.0):.2f} s)"


# ----------------------------------------------------------------------------- CLIPSeg regions


def clipseg_map_to_boxes(probability_map: np.ndarray, threshold: float, min_area: int | None = None,
                         max_regions: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of a probability map above `threshold`, as boxes and masks.

    Args:
        probability_map: (H, W) float in [0, 1].
        threshold: a pixel belongs to a region when its probability is > threshold.
        min_area: smallest region kept, in pixels (None: 0.1% of the map, at least 16 pixels).
        max_regions: keep at most this many regions, largest first.
    Returns:
        boxes (K, 4) float32 xyxy with exclusive right/bottom edges (a region covering columns 10..19 gives
        x0=10, x1=20), masks (K, H, W) bool.
    """
    height, width = probability_map.shape
    min_area = max(16, height * width // 1000) if min_area is None else min_area
    binary = (probability_map > threshold).astype(np.uint8)
    count, component_ids, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = [index + 1 for index in np.argsort(-areas, kind="stable") if areas[index] >= min_area][:max_regions]
    boxes = np.array([[stats[i, 0], stats[i, 1], stats[i, 0] + stats[i, 2], stats[i, 1] + stats[i, 3]] for i in order],
                     np.float32).reshape(-1, 4)
    masks = np.stack([component_ids == i for i in order]) if order else np.zeros((0, height, width), bool)
    return boxes, masks


# ----------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class _Settings:
    box_threshold: float
    text_threshold: float
    clipseg_threshold: float
    nms_iou: float
    multimask: bool
    max_detections: int | None = None  # keep only the highest-scoring boxes after NMS; None = all


def per_label_nms(detections: Detections, iou: float) -> Detections:
    """Non-maximum suppression within each phrase: of two boxes with the same phrase overlapping more than
    `iou`, the lower-scoring one goes; boxes of different phrases never suppress each other."""
    if len(detections.boxes) == 0:
        return detections
    keep = batched_nms(torch.from_numpy(detections.boxes), torch.from_numpy(detections.scores),
                       torch.from_numpy(detections.phrase_index), iou).numpy()
    return Detections(detections.boxes[keep], detections.scores[keep], detections.phrase_index[keep])


def clipseg_regions(image: Image.Image, phrases: list[str], clipseg, threshold: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """CLIPSeg's regions for every phrase: (boxes (N, 4), regions (N, H, W) bool, mean probabilities (N,), labels);
    None when no pixel of any phrase passes `threshold`."""
    boxes, regions, scores, labels = [], [], [], []
    for phrase, probability_map in zip(phrases, clipseg_probabilities(clipseg, image, phrases)):  # (H, W) each
        phrase_boxes, phrase_regions = clipseg_map_to_boxes(probability_map, threshold)
        boxes.append(phrase_boxes)
        regions.append(phrase_regions)
        scores += [float(probability_map[region].mean()) for region in phrase_regions]
        labels += [phrase] * len(phrase_boxes)
    if not labels:
        return None
    return np.concatenate(boxes), np.concatenate(regions), np.asarray(scores, np.float32), labels


def _fallback(image: Image.Image, phrases: list[str], models: SegmentationModels, embeddings, index: int,
              settings: _Settings) -> tuple | None:
    """CLIPSeg regions per phrase, refined by SAM; the coarse region stays where SAM returns an empty mask."""
    found = clipseg_regions(image, phrases, models.clipseg, settings.clipseg_threshold)
    if found is None:
        return None
    boxes, regions, scores, labels = found
    masks, mask_scores = sam2_masks_for_boxes(models.sam, embeddings, index, boxes, regions.shape[1:], settings.multimask)
    empty = ~masks.any(axis=(1, 2))
    masks[empty], mask_scores[empty] = regions[empty], np.nan
    return boxes, scores, labels, masks, mask_scores


def _segment_one(image: Image.Image, detections: Detections, phrases: list[str], prompt: str,
                 models: SegmentationModels, embeddings, index: int, settings: _Settings,
                 timings: dict[str, float]) -> Segmentation:
    size = (image.height, image.width)
    detections = per_label_nms(detections, settings.nms_iou)
    if settings.max_detections is not None and len(detections.scores) > settings.max_detections:
        keep = np.sort(np.argsort(-detections.scores, kind="stable")[: settings.max_detections])
        detections = Detections(detections.boxes[keep], detections.scores[keep], detections.phrase_index[keep])
    start = time.perf_counter()
    if len(detections.boxes):
        masks, mask_scores = sam2_masks_for_boxes(models.sam, embeddings, index, detections.boxes, size, settings.multimask)
        timings["segment"] += time.perf_counter() - start
        labels = [phrases[i] for i in detections.phrase_index]
        message = f"GroundingDINO found {len(labels)} object(s) above box_threshold={settings.box_threshold}"
        return Segmentation(detections.boxes, detections.scores, labels, masks, mask_scores, "grounding-dino", size,
                            prompt, timings, message)
    found = _fallback(image, phrases, models, embeddings, index, settings)
    timings["fallback"] = time.perf_counter() - start
    if found is None:
        return Segmentation.empty(size, prompt, f"no object matched {prompt!r}; lower BOX_THRESHOLD (now "
                                  f"{settings.box_threshold}) / CLIPSEG_THRESHOLD (now {settings.clipseg_threshold}) "
                                  f"or rephrase the prompt", timings)
    message = (f"GroundingDINO found nothing above box_threshold={settings.box_threshold}; CLIPSeg found "
               f"{len(found[2])} region(s) above clipseg_threshold={settings.clipseg_threshold}")
    return Segmentation(*found, "clipseg-fallback", size, prompt, timings, message)


class _StageClock:
    """Seconds per stage of a batch. CUDA runs kernels asynchronously, so on CUDA each stage ends with a
    synchronize: otherwise queued work would be counted in whichever later stage first waits for it."""

    def __init__(self, models: SegmentationModels) -> None:
        devices = {loaded.device for loaded in (models.dino, models.sam, models.clipseg)}
        self.cuda_devices = [device for device in devices if device.type == "cuda"]
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[stage] = now - self.start
        self.start = now


def _segment_batch(named_images: list[tuple[str, np.ndarray]], phrases: list[str], models: SegmentationModels,
                   settings: _Settings) -> list[tuple[str, Segmentation]]:
    prompt = normalize_prompt(phrases)
    clock = _StageClock(models)
    images = [Image.fromarray(array) for _, array in named_images]
    dino_inputs = grounding_dino_inputs(models.dino, images, prompt)
    pixel_values = sam2_pixel_values(models.sam, images)
    clock.lap("preprocess")
    detections = run_grounding_dino(models.dino, images, prompt, len(phrases), settings.box_threshold,
                                    settings.text_threshold, inputs=dino_inputs)
    clock.lap("detect")
    embeddings = sam2_image_embeddings(models.sam, images, pixel_values)
    clock.lap("segment")
    results = []
    for index, (name, _) in enumerate(named_images):  # batched stages are shared equally among the batch
        timings = {stage: seconds / len(images) for stage, seconds in clock.seconds.items()} | {"fallback": 0.0}
        # The per-image stages below end by copying masks to numpy, which waits for the device by itself.
        segmentation = _segment_one(images[index], detections[index], phrases, prompt, models, embeddings, index,
                                    settings, timings)
        timings["total"] = sum(value for key, value in timings.items() if key != "total")
        results.append((name, segmentation))
    return results


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


def iter_segmentations(images: str | os.PathLike | np.ndarray | Iterable, prompt: str | Sequence[str],
                       models: SegmentationModels, box_threshold: float = 0.35, text_threshold: float = 0.25,
                       clipseg_threshold: float = 0.4, nms_iou: float = 0.5, multimask: bool = False,
                       batch_size: int = 4, progress: bool = True,
                       on_unreadable: Callable[[str, Exception], None] | None = None, max_detections: int | None = None
                       ) -> Iterator[tuple[str, np.ndarray, Segmentation]]:
    """Like `segment_images`, but yields (name, image RGB, Segmentation) batch by batch (bounded memory).

    Args:
        on_unreadable: called with (name, error) for a missing or corrupt file, which is then skipped;
            None = raise the FileNotFoundError / ValueError.
        max_detections: keep at most this many GroundingDINO boxes per image (highest scores); None = all.
    """
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    phrases = _fit_phrases(prompt_phrases(prompt), models.dino.processor.tokenizer, max_prompt_tokens(models.dino))
    assert max_detections is None or max_detections >= 1, f"max_detections must be None or >= 1, got {max_detections}"
    settings = _Settings(box_threshold, text_threshold, clipseg_threshold, nms_iou, multimask, max_detections)
    sources = _named_sources(images)
    with tqdm(total=len(sources), desc="segment", unit="image", disable=not progress) as bar:
        for first in range(0, len(sources), batch_size):
            batch = []
            for name, source in sources[first : first + batch_size]:
                try:
                    batch.append((name, load_image(source)))
                except (FileNotFoundError, ValueError) as error:
                    if on_unreadable is None:
                        raise
                    on_unreadable(name, error)
            results = _segment_batch(batch, phrases, models, settings) if batch else []
            bar.update(len(sources[first : first + batch_size]))
            for (name, image), (_, segmentation) in zip(batch, results):
                yield name, image, segmentation


def segment_images(images: str | os.PathLike | np.ndarray | Iterable, prompt: str | Sequence[str],
                   models: SegmentationModels, box_threshold: float = 0.35, text_threshold: float = 0.25,
                   clipseg_threshold: float = 0.4, nms_iou: float = 0.5, multimask: bool = False, batch_size: int = 4,
                   progress: bool = True, skip_unreadable: bool = False,
                   max_detections: int | None = None) -> list[tuple[str, Segmentation]]:
    """Segment every image of a folder or list with one prompt (batched GroundingDINO and SAM encoder).

    Args:
        images: a folder, an image path, an array/PIL image, or a list of paths/arrays.
        prompt, models, thresholds, nms_iou, multimask: as in `segment_image`.
        batch_size: images per forward pass. progress: show a tqdm bar.
        skip_unreadable: warn and go on past missing/corrupt files instead of raising.
        max_detections: keep at most this many GroundingDINO boxes per image (highest scores); None = all.
    Returns:
        [(source name, Segmentation)] in input order (file name for paths, "image_<i>" for arrays).
        All masks stay in memory: for large folders iterate `iter_segmentations` instead.
    """
    def warn(name: str, error: Exception) -> None:
        warnings.warn(f"skipped {name}: {error}", stacklevel=4)

    return [(name, segmentation) for name, _, segmentation in iter_segmentations(
        images, prompt, models, box_threshold, text_threshold, clipseg_threshold, nms_iou, multimask, batch_size,
        progress, warn if skip_unreadable else None, max_detections)]


def segment_image(image: str | os.PathLike | np.ndarray | Image.Image, prompt: str | Sequence[str],
                  models: SegmentationModels, box_threshold: float = 0.35, text_threshold: float = 0.25,
                  clipseg_threshold: float = 0.4, nms_iou: float = 0.5, multimask: bool = False) -> Segmentation:
    """Find the prompt's objects in one image and segment them.

    Args:
        image: path, (H, W[, C]) array or PIL image.
        prompt: "a cat. a remote", "cat, dog" or ["cat", "dog"].
        models: from nbhelpers.seg.models.load_models.
        box_threshold / text_threshold: GroundingDINO box and phrase score minimums.
        clipseg_threshold: probability above which CLIPSeg pixels form fallback regions.
        nms_iou: boxes of one label overlapping more than this are merged (kept: the highest score).
        multimask: SAM predicts three masks per box and the best by predicted IoU is kept.
    Returns:
        Segmentation at the original resolution; source "none" and a message when nothing matched.
    """
    return segment_images([image], prompt, models, box_threshold, text_threshold, clipseg_threshold, nms_iou,
                          multimask, batch_size=1, progress=False)[0][1]
