"""Segmentation backends: the model families behind `segment_image(s)` and the video detector.

The pipeline (nbhelpers.seg.image, nbhelpers.seg.video) talks to a backend only through `SegmentationBackend`;
`GroundingDinoSam2Backend`: GroundingDINO-family boxes -> SAM 2.1 masks, and where the detector finds nothing,
CLIPSeg regions refined by SAM (the default, what the assignment asks for). `Sam3Backend`: SAM 3 segments every
instance of each phrase in one model. `as_backend` picks the class from the loaded models object.
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
from nbhelpers.seg.inputs import TextLimit, fit_phrases, normalize_prompt
from nbhelpers.seg.models import LoadedModel, Sam3Models, SegmentationModels, text_token_limit
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


def as_backend(models: SegmentationModels | Sam3Models | SegmentationBackend) -> SegmentationBackend:
    """The backend for loaded models (SegmentationModels -> GroundingDinoSam2Backend, Sam3Models -> Sam3Backend);
    a backend is returned as is."""
    if isinstance(models, SegmentationModels):
        return GroundingDinoSam2Backend(models)
    if isinstance(models, Sam3Models):
        return Sam3Backend(models)
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


def per_label_nms_indices(detections: Detections, iou: float) -> np.ndarray:
    """Rows kept by non-maximum suppression within each phrase: of two boxes with the same phrase overlapping more
    than `iou`, the lower-scoring one goes; boxes of different phrases never suppress each other."""
    if len(detections.boxes) == 0:
        return np.zeros(0, np.int64)
    return batched_nms(torch.from_numpy(detections.boxes), torch.from_numpy(detections.scores),
                       torch.from_numpy(detections.phrase_index), iou).numpy()


def per_label_nms(detections: Detections, iou: float) -> Detections:
    """`detections` without the rows per-label NMS drops (see `per_label_nms_indices`)."""
    keep = per_label_nms_indices(detections, iou)
    return Detections(detections.boxes[keep], detections.scores[keep], detections.phrase_index[keep])


def _best_rows(scores: np.ndarray, max_detections: int | None) -> np.ndarray:
    """Indices of the `max_detections` highest scores (ties: the earlier first), in their original order (None: all)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order if max_detections is None else order[:max_detections])


def _keep_best(detections: Detections, max_detections: int | None) -> Detections:
    """At most `max_detections` boxes, the highest scores, in their original order (None: all)."""
    if max_detections is None or len(detections.scores) <= max_detections:
        return detections
    keep = _best_rows(detections.scores, max_detections)
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

    def __init__(self, models: list[LoadedModel], sync: bool = False) -> None:
        devices = {loaded.device for loaded in models} if sync else set()
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
        dino, clipseg = self.models.dino, self.models.clipseg  # CLIPSeg (the fallback) reads each phrase alone
        return fit_phrases(phrases, [TextLimit("GroundingDINO", dino.processor.tokenizer, max_prompt_tokens(dino), True),
                                     TextLimit("CLIPSeg", clipseg.processor.tokenizer, text_token_limit(clipseg))])

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
        clock = StageClock([models.dino, models.sam, models.clipseg], sync=profile)
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


# ----------------------------------------------------------------------------- SAM 3


def _rows_of(rows: np.ndarray, offset: int, count: int) -> torch.Tensor:
    """The kept rows that fall in one phrase's block [offset, offset + count), relative to the block."""
    inside = rows[(rows >= offset) & (rows < offset + count)]
    return torch.from_numpy(inside - offset)


class Sam3Backend:
    """SAM 3: one prompt per phrase over one image embedding; every instance above `sam3_threshold` is kept, then
    per-label NMS (SAM 3's image post-processing has none) and the `max_detections` cap."""

    name = "sam3"

    def __init__(self, models: Sam3Models) -> None:
        self.models = models
        self.sam3 = models.image

    def describe(self) -> dict[str, str]:
        return self.models.describe()

    def max_prompt_tokens(self) -> int:
        """Tokens SAM 3's text encoder reads per phrase, special tokens included (32 for facebook/sam3)."""
        return text_token_limit(self.sam3)

    def fit_phrases(self, phrases: list[str]) -> list[str]:
        return fit_phrases(phrases, [TextLimit("SAM 3", self.sam3.processor.tokenizer, self.max_prompt_tokens())])

    def detect(self, image: np.ndarray, phrases: list[str], settings: DetectionSettings) -> FrameDetections:
        found = self.segment_images([image], phrases, settings)[0]
        return FrameDetections(found.boxes, found.scores, found.labels, "sam3" if len(found) else "none")

    def _phrase_inputs(self, phrases: list[str]):
        tokens = self.sam3.processor.tokenizer(phrases, padding="max_length", truncation=True,
                                               max_length=self.max_prompt_tokens(), return_tensors="pt")
        return tokens["input_ids"].to(self.sam3.device), tokens["attention_mask"].to(self.sam3.device)

    def segment_images(self, images: list[np.ndarray], phrases: list[str], settings: DetectionSettings,
                       profile: bool = False) -> list[Segmentation]:
        sam3, clock = self.sam3, StageClock([self.sam3], sync=profile)
        inputs = sam3.processor(images=[Image.fromarray(array) for array in images], return_tensors="pt")
        sizes = inputs["original_sizes"].tolist()
        input_ids, attention_mask = self._phrase_inputs(phrases)
        clock.lap("preprocess")
        with torch.inference_mode(), sam3.autocast():
            vision = sam3.model.get_vision_features(pixel_values=inputs["pixel_values"].to(sam3.device))
            clock.lap("segment")
            per_image: list[list[tuple]] = [[] for _ in images]
            for index in range(len(phrases)):  # the vision features are computed once and reused for every phrase
                batch = len(images)
                outputs = sam3.model(vision_embeds=vision, input_ids=input_ids[index : index + 1].expand(batch, -1),
                                     attention_mask=attention_mask[index : index + 1].expand(batch, -1))
                found = sam3.processor.post_process_instance_segmentation(
                    outputs, threshold=settings.sam3_threshold, mask_threshold=settings.sam3_mask_threshold,
                    target_sizes=sizes)
                for image_results, result in zip(per_image, found):
                    image_results.append((index, result))
        results = [self._segmentation(found, phrases, [int(v) for v in size], settings)
                   for found, size in zip(per_image, sizes)]
        clock.lap("detect")
        for segmentation in results:  # batched stages are shared equally among the batch
            segmentation.timings = {stage: seconds / len(images) for stage, seconds in clock.seconds.items()}
            segmentation.timings |= {"fallback": 0.0, "total": sum(segmentation.timings.values())}
        return results

    def _segmentation(self, found: list[tuple], phrases: list[str], size: list[int],
                      settings: DetectionSettings) -> Segmentation:
        """One image's instances of every phrase, after per-label NMS and the cap."""
        height, width = size
        boxes = np.concatenate([r["boxes"].float().cpu().numpy().reshape(-1, 4) for _, r in found]).astype(np.float32)
        boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clip(0, width), boxes[:, 1::2].clip(0, height)
        scores = np.concatenate([r["scores"].float().cpu().numpy() for _, r in found]).astype(np.float32)
        phrase_index = np.concatenate([np.full(len(r["scores"]), index, np.int64) for index, r in found])
        rows = per_label_nms_indices(Detections(boxes, scores, phrase_index), settings.nms_iou)
        rows = np.sort(rows[_best_rows(scores[rows], settings.max_detections)])
        prompt = normalize_prompt(phrases)
        if not len(rows):
            return Segmentation.empty((height, width), prompt, f"SAM 3 found no instance of {prompt!r} above "
                                      f"sam3_threshold={settings.sam3_threshold}; lower SAM3_THRESHOLD or rephrase "
                                      f"the prompt", backend=self.name)
        masks = np.concatenate([r["masks"][_rows_of(rows, offset, len(r["scores"]))].bool().cpu().numpy()
                                for offset, (_, r) in zip(np.cumsum([0] + [len(r["scores"]) for _, r in found]), found)])
        message = f"SAM 3 found {len(rows)} instance(s) above sam3_threshold={settings.sam3_threshold}"
        return Segmentation(boxes[rows], scores[rows], [phrases[i] for i in phrase_index[rows]], masks,
                            np.full(len(rows), np.nan, np.float32), "sam3", (height, width), prompt, {}, message,
                            self.name)
