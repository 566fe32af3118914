"""The image pipeline one stage at a time, for the Q2 notebook's walkthrough: boxes, then masks from those boxes.

The same calls the pipeline makes (nbhelpers.seg.backends, nbhelpers.seg.inference), kept apart so that a reader
can see what each stage hands to the next: the detector's boxes with their scores, then SAM 2.1 prompted with
exactly those boxes. Drawing is in nbhelpers.seg.render (`show_boxes`, `show_masks`, `show`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nbhelpers.seg.backends import GroundingDinoSam2Backend, as_backend
from nbhelpers.seg.inference import sam2_image_embeddings, sam2_masks_for_boxes
from nbhelpers.seg.inputs import IMAGE_EXTENSIONS, list_image_files, load_image, normalize_prompt, prompt_phrases
from nbhelpers.seg.models import Sam3Models, SegmentationModels
from nbhelpers.seg.pipeline import SAMPLE_IMAGE, SegmentConfig
from nbhelpers.seg.types import DetectionSettings, FrameDetections, Segmentation
from nbhelpers.seg.video.io import list_video_files


@dataclass
class ImageStages:
    """What each stage of the image pipeline produced for one image."""

    name: str  # image file name
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8 RGB
    detections: FrameDetections  # stage 1: boxes (xyxy px), scores, labels and which detector found them
    segmentation: Segmentation  # stage 2: one mask per box of stage 1, in the same order
    seconds: dict[str, float]  # "detect", "masks": wall time of each stage


def first_image(config: SegmentConfig) -> Path:
    """The configured image, or the first image of the configured folder (sorted by name)."""
    source = config.image_source()
    if not source.is_dir():
        return source
    files = list_image_files(source)
    if not files and list_video_files(source):  # a folder of videos: the walkthrough shows the sample image
        print(f"IMAGE_PATH {str(source)!r} holds videos and no image: the stage-by-stage walkthrough uses {SAMPLE_IMAGE.name}.")
        return SAMPLE_IMAGE
    if not files:
        raise ValueError(f"no images in folder {str(source)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return files[0]


def run_stages(image_rgb: np.ndarray, prompt: str, models: SegmentationModels | Sam3Models,
               settings: DetectionSettings = DetectionSettings(), name: str = "image") -> ImageStages:
    """Detect, then segment from the detected boxes, keeping each stage's output.

    Args:
        image_rgb: (H, W, 3) uint8. prompt: "car. sun." or a list of phrases. models: from `load_models` (or SAM 3's).
        settings: thresholds, NMS and box cap, as for `segment_image`. name: shown in titles.
    Returns:
        ImageStages. With GroundingDINO + SAM 2.1 the masks are SAM 2.1's for exactly the detected boxes (a CLIPSeg
        fallback box whose SAM mask is empty stays empty here; the pipeline keeps CLIPSeg's coarse region there).
        With SAM 3 one model finds and segments: its boxes are those of its instances.
    """
    backend = as_backend(models)
    phrases = backend.fit_phrases(prompt_phrases(prompt))
    start = time.perf_counter()
    if not isinstance(backend, GroundingDinoSam2Backend):  # SAM 3: boxes and masks come out of one call
        segmentation = backend.segment_images([image_rgb], phrases, settings)[0]
        detections = FrameDetections(segmentation.boxes, segmentation.scores, segmentation.labels,
                                     segmentation.source)
        return ImageStages(name, image_rgb, detections, segmentation, {"detect": time.perf_counter() - start, "masks": 0.0})
    detections = backend.detect(image_rgb, phrases, settings)  # what the video pipeline's (re-)detection calls
    detected = time.perf_counter()
    sam, size = backend.models.sam, image_rgb.shape[:2]
    embeddings = sam2_image_embeddings(sam, [Image.fromarray(image_rgb)])
    masks, mask_scores = sam2_masks_for_boxes(sam, embeddings, 0, detections.boxes, size, settings.multimask)
    segmentation = Segmentation(detections.boxes, detections.scores, list(detections.labels), masks, mask_scores,
                                detections.source, size, normalize_prompt(phrases),
                                message=f"SAM 2.1 made {len(masks)} mask(s) from {len(detections.boxes)} box(es)",
                                backend=backend.name)
    return ImageStages(name, image_rgb, detections, segmentation,
                       {"detect": detected - start, "masks": time.perf_counter() - detected})


def image_stages(config: SegmentConfig, models: SegmentationModels | Sam3Models) -> ImageStages:
    """`run_stages` on the configured image (the first of a folder) with the configured prompt and thresholds."""
    path = first_image(config)
    return run_stages(load_image(path), config.prompt, models, config.detection, name=path.name)
