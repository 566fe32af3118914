"""Per-frame detection for video: the image pipeline's GroundingDINO, else CLIPSeg regions' boxes.

Any callable frame RGB -> FrameDetections can replace it (tests use a colour detector; other detectors fit too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from nbhelpers.seg.image import clipseg_regions, per_label_nms
from nbhelpers.seg.inference import max_prompt_tokens, run_grounding_dino
from nbhelpers.seg.inputs import _fit_phrases, normalize_prompt, prompt_phrases
from nbhelpers.seg.models import SegmentationModels


@dataclass
class FrameDetections:
    """Objects found on one frame."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in pixels
    scores: np.ndarray  # (N,) float32
    labels: list[str]  # (N,) prompt phrases
    source: str  # "grounding-dino" | "clipseg-fallback" | a custom detector's name


Detector = Callable[[np.ndarray], FrameDetections]


def text_detector(models: SegmentationModels, prompt: str | Sequence[str], box_threshold: float = 0.35,
                  text_threshold: float = 0.25, clipseg_threshold: float = 0.4, nms_iou: float = 0.5) -> Detector:
    """The image pipeline's detection as a per-frame detector: GroundingDINO, else CLIPSeg regions' boxes.

    Returns:
        detect(frame RGB (H, W, 3) uint8) -> FrameDetections.
    """
    phrases = _fit_phrases(prompt_phrases(prompt), models.dino.processor.tokenizer, max_prompt_tokens(models.dino))
    normalized = normalize_prompt(phrases)

    def detect(frame_rgb: np.ndarray) -> FrameDetections:
        image = Image.fromarray(frame_rgb)
        found = run_grounding_dino(models.dino, [image], normalized, len(phrases), box_threshold, text_threshold)[0]
        found = per_label_nms(found, nms_iou)
        if len(found.boxes):
            return FrameDetections(found.boxes, found.scores, [phrases[i] for i in found.phrase_index], "grounding-dino")
        regions = clipseg_regions(image, phrases, models.clipseg, clipseg_threshold)
        if regions is None:
            return FrameDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], "none")
        boxes, _, scores, labels = regions
        return FrameDetections(boxes.astype(np.float32), scores, labels, "clipseg-fallback")

    return detect
