"""Segmentation backends: the model families behind `segment_image(s)` and the video detector.

The pipeline (nbhelpers.seg.image, nbhelpers.seg.video) talks to a backend only through `SegmentationBackend`;
`GroundingDinoSam2Backend` is the one implemented: GroundingDINO boxes -> SAM 2.1 masks, and where GroundingDINO
finds nothing, CLIPSeg regions refined by SAM. A second family (e.g. SAM 3) is one more class with the same
methods, returned by `as_backend` for its own models object.
"""
from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms

from nbhelpers.seg.inference import (clipseg_probabilities, grounding_dino_inputs, max_prompt_tokens,
                                     run_grounding_dino, sam2_image_embeddings, sam2_masks_for_boxes,
                                     sam2_pixel_values)
from nbhelpers.seg.inputs import fit_phrases, normalize_prompt
from nbhelpers.seg.models import SegmentationModels
from nbhelpers.seg.types import DetectionSettings, Detections, FrameDetections, Segmentation


@runtime_checkable
class SegmentationBackend(Protocol):
    """What the image and video pipelines need from a model family."""

    name: str  # recorded in Segmentation.backend

    def fit_phrases(self, phrases: list[str]) -> list[str]:
        """The phrases the backend can read at once (a long prompt is cut, with a warning)."""

    def segment_images(self, images: list[np.ndarray], phrases: list[str], settings: DetectionSettings,
                       profile: bool = False) -> list[Segmentation]:
        """One Segmentation per (H, W, 3) uint8 RGB image, in order; `profile` makes the timings exact."""

    def detect(self, image: np.ndarray, phrases: list[str], settings: DetectionSettings) -> FrameDetections:
        """Boxes only (no masks) for one RGB image: the video pipeline's (re-)detection step."""

    def describe(self) -> dict[str, str]:
        """Model ids and devices, for metadata files."""


def as_backend(models: SegmentationModels | SegmentationBackend) -> SegmentationBackend:
    """The backend for loaded models (SegmentationModels -> GroundingDinoSam2Backend); a backend is returned as is."""
    if isinstance(models, SegmentationModels):
        return GroundingDinoSam2Backend(models)
    if isinstance(models, SegmentationBackend):
        return models
    raise TypeError(f"expected SegmentationModels (from load_models) or a SegmentationBackend, got {type(models).__name__}.")


# ----------------------------------------------------------------------------- CLIPSeg regions and NMS


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


def per_label_nms(detections: Detections, iou: float) -> Detections:
    """Non-maximum suppression within each phrase: of two boxes with the same phrase overlapping more than
    `iou`, the lower-scoring one goes; boxes of different phrases never suppress each other."""
    if len(detections.boxes) == 0:
        return detections
    keep = batched_nms(torch.from_numpy(detections.boxes), torch.from_numpy(detections.scores),
                       torch.from_numpy(detections.phrase_index), iou).numpy()
    return Detections(detections.boxes[keep], detections.scores[keep], detections.phrase_index[keep])


def _keep_best(detections: Detections, max_detections: int | None) -> Detections:
    """At most `max_detections` boxes, the highest scores, in their original order (None: all)."""
    if max_detections is None or len(detections.scores) <= max_detections:
        return detections
    keep = np.sort(np.argsort(-detections.scores, kind="stable")[:max_detections])
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


# ----------------------------------------------------------------------------- timing


class StageClock:
    """Seconds per stage of a batch.

    CUDA runs kernels asynchronously: without a synchronize, queued work is counted in whichever later stage
    first waits for it. With `sync=True` (profiling) each stage ends with a synchronize on the CUDA devices of
    `models`, so the split is exact; by default there is none, so production runs are not slowed down.
    """

    def __init__(self, models: SegmentationModels, sync: bool = False) -> None:
        devices = {loaded.device for loaded in (models.dino, models.sam, models.clipseg)} if sync else set()
        self.cuda_devices = [device for device in devices if device.type == "cuda"]
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[stage] = now - self.start
        self.start = now


# ----------------------------------------------------------------------------- GroundingDINO -> SAM 2.1


class GroundingDinoSam2Backend:
    """GroundingDINO boxes -> SAM 2.1 masks; CLIPSeg regions refined by SAM where GroundingDINO finds nothing."""

    name = "grounding-dino+sam2"

    def __init__(self, models: SegmentationModels) -> None:
        self.models = models

    def describe(self) -> dict[str, str]:
        return self.models.describe()

    def fit_phrases(self, phrases: list[str]) -> list[str]:
        dino = self.models.dino
        return fit_phrases(phrases, dino.processor.tokenizer, max_prompt_tokens(dino))

    def detect(self, image: np.ndarray, phrases: list[str], settings: DetectionSettings) -> FrameDetections:
        picture = Image.fromarray(image)
        found = run_grounding_dino(self.models.dino, [picture], normalize_prompt(phrases), len(phrases),
                                   settings.box_threshold, settings.text_threshold)[0]
        found = _keep_best(per_label_nms(found, settings.nms_iou), settings.max_detections)
        if len(found.boxes):
            return FrameDetections(found.boxes, found.scores, [phrases[i] for i in found.phrase_index], "grounding-dino")
        regions = clipseg_regions(picture, phrases, self.models.clipseg, settings.clipseg_threshold)
        if regions is None:
            return FrameDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], "none")
        boxes, _, scores, labels = regions
        return FrameDetections(boxes.astype(np.float32), scores, labels, "clipseg-fallback")

    def segment_images(self, images: list[np.ndarray], phrases: list[str], settings: DetectionSettings,
                       profile: bool = False) -> list[Segmentation]:
        models = self.models
        prompt = normalize_prompt(phrases)
        clock = StageClock(models, sync=profile)
        pictures = [Image.fromarray(array) for array in images]
        dino_inputs = grounding_dino_inputs(models.dino, pictures, prompt)
        pixel_values = sam2_pixel_values(models.sam, pictures)
        clock.lap("preprocess")
        detections = run_grounding_dino(models.dino, pictures, prompt, len(phrases), settings.box_threshold,
                                        settings.text_threshold, inputs=dino_inputs)
        clock.lap("detect")
        embeddings = sam2_image_embeddings(models.sam, pictures, pixel_values)
        clock.lap("segment")
        results = []
        for index, picture in enumerate(pictures):  # batched stages are shared equally among the batch
            timings = {stage: seconds / len(pictures) for stage, seconds in clock.seconds.items()} | {"fallback": 0.0}
            # The per-image stages below end by copying masks to numpy, which waits for the device by itself.
            segmentation = self._segment_one(picture, detections[index], phrases, prompt, embeddings, index, settings,
                                             timings)
            timings["total"] = sum(value for key, value in timings.items() if key != "total")
            results.append(segmentation)
        return results

    def _segment_one(self, image: Image.Image, detections: Detections, phrases: list[str], prompt: str, embeddings,
                     index: int, settings: DetectionSettings, timings: dict[str, float]) -> Segmentation:
        size = (image.height, image.width)
        detections = _keep_best(per_label_nms(detections, settings.nms_iou), settings.max_detections)
        start = time.perf_counter()
        if len(detections.boxes):
            masks, mask_scores = sam2_masks_for_boxes(self.models.sam, embeddings, index, detections.boxes, size,
                                                      settings.multimask)
            timings["segment"] += time.perf_counter() - start
            labels = [phrases[i] for i in detections.phrase_index]
            message = f"GroundingDINO found {len(labels)} object(s) above box_threshold={settings.box_threshold}"
            return Segmentation(detections.boxes, detections.scores, labels, masks, mask_scores, "grounding-dino", size,
                                prompt, timings, message, self.name)
        found = self._fallback(image, phrases, embeddings, index, settings)
        timings["fallback"] = time.perf_counter() - start
        if found is None:
            return Segmentation.empty(size, prompt, f"no object matched {prompt!r}; lower BOX_THRESHOLD (now "
                                      f"{settings.box_threshold}) / CLIPSEG_THRESHOLD (now {settings.clipseg_threshold}) "
                                      f"or rephrase the prompt", timings, self.name)
        message = (f"GroundingDINO found nothing above box_threshold={settings.box_threshold}; CLIPSeg found "
                   f"{len(found[2])} region(s) above clipseg_threshold={settings.clipseg_threshold}")
        return Segmentation(*found, "clipseg-fallback", size, prompt, timings, message, self.name)

    def _fallback(self, image: Image.Image, phrases: list[str], embeddings, index: int,
                  settings: DetectionSettings) -> tuple | None:
        """CLIPSeg regions per phrase, refined by SAM; the coarse region stays where SAM returns an empty mask."""
        found = clipseg_regions(image, phrases, self.models.clipseg, settings.clipseg_threshold)
        if found is None:
            return None
        boxes, regions, scores, labels = found
        masks, mask_scores = sam2_masks_for_boxes(self.models.sam, embeddings, index, boxes, regions.shape[1:],
                                                  settings.multimask)
        empty = ~masks.any(axis=(1, 2))
        masks[empty], mask_scores[empty] = regions[empty], np.nan
        return boxes, scores, labels, masks, mask_scores
