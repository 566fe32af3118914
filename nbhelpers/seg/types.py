"""The records the segmentation code passes around and returns, and its one copy of the detection defaults.

numpy only (no torch, no transformers): rendering, export and the UI import it cheaply.
    DEFAULT_*          the default checkpoints (hub ids), so that the CLI can show them without importing torch
    DetectionSettings  thresholds and limits of one run (the defaults live here and nowhere else)
    VideoSettings      frame sampling and object identity in videos (its defaults likewise live only here)
    Detections         a detector's raw boxes for one image (phrase indices, before NMS)
    Segmentation       one image's result: boxes, labels, masks at the original resolution
    FrameDetections    objects found on one video frame (labels instead of phrase indices)
    FrameMasks         SAM 2's masks for one video frame
    Track              one object followed through a video (one entry of tracks.json)
    VideoSegmentation  what segment_video found and wrote
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam2.1-hiera-tiny"
DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
DEFAULT_SAM3 = "facebook/sam3"  # one hub repo holds both the image (Sam3Model) and the video (Sam3VideoModel) model
DEFAULT_BACKEND = "gdino-sam2"  # GroundingDINO -> SAM 2.1 (+ CLIPSeg fallback): what the assignment asks for
DEFAULT_BATCH_SIZE = 4  # images per forward pass

# Segmentation.timings keys, in seconds. Batched stages are shared equally among the images of a batch.
OVERLAY_ALPHA = 0.5  # mask opacity in every overlay drawn (images, the UI, video frames): 0 = invisible, 1 = opaque

TIMING_STAGES = {
    "preprocess": "PIL conversion plus the GroundingDINO and SAM processors (resize, normalise, tokenise), to device",
    "detect": "GroundingDINO forward pass and box post-processing",
    "segment": "SAM image encoder, then its mask decoder on the boxes and upsampling to the image size",
    "fallback": "CLIPSeg (its preprocessing included) and SAM refinement of its regions; 0 when not needed",
    # SAM 3 backend: "preprocess" = its processor, "segment" = the vision encoder (once per image), "detect" = the
    # text encoder, DETR decoder and mask head for every phrase plus post-processing and NMS; "fallback" = 0.
    "total": "sum of the stages above",
}


def _none_takes_default(settings: Any) -> None:
    """Give every field passed as None its default (the notebook and the CLI pass None for what they leave alone)."""
    for spec in fields(settings):
        if getattr(settings, spec.name) is None:
            object.__setattr__(settings, spec.name, spec.default)


@dataclass(frozen=True)
class DetectionSettings:
    """How objects are detected and segmented; shared by images, videos, the notebook, the CLI and the UI.

    A field given as None takes its default. Raises ValueError naming the field when a value is out of range (the
    one place the ranges are checked: the CLI, the notebook and the UI build this class).
    """

    box_threshold: float = 0.35  # GroundingDINO box score minimum (higher = fewer, surer boxes)
    text_threshold: float = 0.25  # GroundingDINO phrase score minimum
    clipseg_threshold: float = 0.4  # CLIPSeg probability above which fallback regions are taken
    nms_iou: float = 0.5  # boxes of one label overlapping more than this are merged (the highest score stays)
    max_detections: int | None = None  # keep only the highest-scoring boxes after NMS; None = all
    multimask: bool = False  # SAM predicts three masks per box and keeps the best by predicted IoU (images only)
    sam3_threshold: float = 0.5  # SAM 3 instance score minimum (query score x presence score; video: detection score)
    sam3_mask_threshold: float = 0.5  # SAM 3 mask probability above which a pixel belongs to the instance

    def __post_init__(self) -> None:
        _none_takes_default(self)
        for name in ("box_threshold", "text_threshold", "clipseg_threshold", "nms_iou", "sam3_threshold",
                     "sam3_mask_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1].")
        if not isinstance(self.multimask, (bool, np.bool_)):
            raise ValueError(f"multimask={self.multimask!r} must be True or False.")
        if self.max_detections is not None and self.max_detections < 1:
            raise ValueError(f"max_detections={self.max_detections}: use None (all) or at least 1.")

    def as_dict(self) -> dict[str, Any]:
        """Field -> value, for metadata files."""
        return asdict(self)


@dataclass
class Detections:
    """A detector's boxes for one image, before NMS."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in original-image pixels, clipped to the image
    scores: np.ndarray  # (N,) float32 box confidence
    phrase_index: np.ndarray  # (N,) int64 index into the prompt's phrases


@dataclass
class Segmentation:
    """Result for one image; everything at the original image resolution."""

    boxes: np.ndarray  # (N, 4) float32, xyxy in original-image pixels
    scores: np.ndarray  # (N,) float32 detection scores (CLIPSeg fallback: mean probability inside the region)
    labels: list[str]  # (N,) phrases matched to each box
    masks: np.ndarray  # (N, H, W) bool
    mask_scores: np.ndarray  # (N,) float32 SAM predicted IoU (NaN: fallback without SAM refinement, and SAM 3)
    source: str  # "grounding-dino" | "clipseg-fallback" | "sam3" | "sam2-video" | "none": the stage that found them
    image_size: tuple[int, int]  # (H, W) of the original image
    prompt: str  # normalised prompt, e.g. "cat. dog."
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, keys: TIMING_STAGES
    message: str = ""  # human-readable note (e.g. why nothing was found)
    backend: str = ""  # the SegmentationBackend (model family) that produced it, e.g. "grounding-dino+sam2"

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, image_size: tuple[int, int], prompt: str, message: str, timings: dict[str, float] | None = None,
              backend: str = "") -> "Segmentation":
        height, width = image_size
        return cls(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), [], np.zeros((0, height, width), bool),
            np.zeros(0, np.float32), "none", image_size, prompt, timings or {}, message, backend,
        )

    def summary(self) -> str:
        """One line: how many objects of which label, from which stage."""
        counts = {label: self.labels.count(label) for label in dict.fromkeys(self.labels)}
        found = ", ".join(f"{count}x {label!r}" for label, count in counts.items()) or "nothing"
        return f"{found} ({self.source}, {self.timings.get('total', 0.0):.2f} s)"


# ----------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoSettings:
    """How a video is sampled and how its objects keep their ids; shared by the notebook, the CLI and segment_video.

    A field given as None takes its default. Raises ValueError naming the field when a value is out of range (the
    one place the ranges are checked).
    """

    frame_stride: int = 1  # process every n-th source frame (the overlay keeps the source's duration)
    max_frames: int | None = None  # stop after this many processed frames; None = the whole video
    redetect_every: int = 10  # processed frames between detections that add or revive objects; 0 = detect once
    max_objects: int = 20  # most objects in SAM 2's session at once (each costs SAM 2 time on every frame)
    forget_after_s: float = 3.0  # seconds of video a lost object stays in the session (revivable, costs SAM 2 time)
    match_iou: float = 0.3  # IoU of a detection's box with a visible object's mask (or box) above which it is that object
    revive_distance: float = 1.0  # box diagonals from where a lost object was last seen, plus as many per second lost,
    #                               within which a detection of its label revives its id (0 = never revive)
    merge_iou: float = 0.7  # mask IoU above which two visible objects count as one ...
    merge_frames: int = 3  # ... once it lasts this many frames in a row: the younger id merges into the older; 0 = never
    clipseg_redetect: bool = False  # let CLIPSeg regions add objects at re-detection frames too (else it only seeds)
    overlay_alpha: float = OVERLAY_ALPHA  # mask opacity in video_overlay.mp4 (0 = masks invisible, 1 = opaque)

    def __post_init__(self) -> None:
        _none_takes_default(self)
        checks = {"frame_stride": (self.frame_stride >= 1, "use 1 (every frame) or more"),
                  "max_frames": (self.max_frames is None or self.max_frames >= 1, "use None (all) or at least 1"),
                  "redetect_every": (self.redetect_every >= 0, "use 0 (off) or a number of frames"),
                  "max_objects": (self.max_objects >= 1, "must be at least 1"),
                  "forget_after_s": (self.forget_after_s >= 0, "use seconds of video, 0 or more"),
                  "match_iou": (0.0 <= self.match_iou <= 1.0, "must be in [0, 1]"),
                  "revive_distance": (self.revive_distance >= 0, "use 0 (off) or a number of box diagonals"),
                  "merge_iou": (0.0 < self.merge_iou <= 1.0, "must be in (0, 1]"),
                  "merge_frames": (self.merge_frames >= 0, "use 0 (off) or a number of frames"),
                  "overlay_alpha": (0.0 <= self.overlay_alpha <= 1.0, "must be in [0, 1]")}
        for name, (ok, fix) in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)}: {fix}.")

    def forget_after_frames(self, output_fps: float) -> int:
        """The forgetting horizon in processed frames at `output_fps` (at least 1)."""
        return max(1, round(self.forget_after_s * output_fps))

    def as_dict(self) -> dict[str, Any]:
        """Field -> value, for metadata files."""
        return asdict(self)


@dataclass
class FrameDetections:
    """Objects found on one frame."""

    boxes: np.ndarray  # (N, 4) float32 xyxy in pixels
    scores: np.ndarray  # (N,) float32
    labels: list[str]  # (N,) prompt phrases
    source: str  # "grounding-dino" | "clipseg-fallback" | "none" | a custom detector's name


@dataclass
class FrameMasks:
    """SAM 2's result for one frame."""

    object_ids: list[int]  # in the session's order (the order objects were added)
    masks: np.ndarray  # (N, H, W) bool at the video's resolution; all False where the object is not visible
    object_scores: np.ndarray  # (N,) float32 SAM 2 object-presence logits (> 0: visible)


@dataclass
class Track:
    """One object followed through the video; frame numbers count output frames (source frame = frame × stride)."""

    object_id: int  # stable id, never reused for another object
    label: str  # prompt phrase that detected it
    score: float  # detection score when it was added
    source: str  # "grounding-dino" | "clipseg-fallback" | the detector's name
    first_frame: int  # frame it was detected and added on
    last_frame: int | None = None  # last frame with a non-empty mask (None: never visible after seeding)
    lost_since: int | None = None  # first frame of its current absence; None while visible
    frames: list[dict[str, Any]] = field(default_factory=list)  # visible frames: {"frame", "box_xyxy"[, "mask_rle"]}
    ended: str | None = None  # None while in SAM 2's session; "forgotten" (lost too long) or "merged" (a duplicate)
    ended_frame: int | None = None  # frame it left the session on
    merged_into: int | None = None  # for "merged": the older id that carries the object on
    merged_ids: list[int] = field(default_factory=list)  # younger duplicate ids merged into this one
    revived_frames: list[int] = field(default_factory=list)  # frames a detection brought it back under its id

    def record(self, frame: int, mask: np.ndarray | None, encode_mask: Callable[[np.ndarray], dict] | None = None) -> None:
        """Note this frame's mask (None or empty: not visible → the track is lost from here).

        Args:
            encode_mask: (H, W) bool -> JSON-ready RLE, stored as "mask_rle"; None = store the box only.
        """
        if mask is None or not mask.any():
            if self.lost_since is None and self.last_frame is not None:
                self.lost_since = frame
            return
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        entry: dict[str, Any] = {"frame": frame, "box_xyxy": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]}
        if encode_mask is not None:
            entry["mask_rle"] = encode_mask(mask)
        self.frames.append(entry)
        self.last_frame, self.lost_since = frame, None

    @property
    def state(self) -> str:
        """"forgotten" / "merged" once out of the session; else "visible" if its mask was non-empty on the last
        frame recorded, else "lost"."""
        if self.ended is not None:
            return self.ended
        return "visible" if self.lost_since is None and self.last_frame is not None else "lost"

    def frames_lost(self, frame: int) -> int:
        """How many frames before `frame` its absence began (0 while visible; counted from `first_frame` if it
        was never visible)."""
        if self.state == "visible":
            return 0
        return frame - (self.lost_since if self.lost_since is not None else self.first_frame)

    def end(self, frame: int, reason: str, merged_into: int | None = None) -> None:
        """Leave the session on `frame` ("forgotten" or "merged"); the record keeps its frames."""
        self.ended, self.ended_frame, self.merged_into = reason, frame, merged_into

    def last_box(self) -> list[int] | None:
        """Box (xyxy px) of the last frame it was visible on; None if it never was."""
        return self.frames[-1]["box_xyxy"] if self.frames else None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.object_id, "label": self.label, "score": round(float(self.score), 4), "source": self.source,
                "first_frame": self.first_frame, "last_frame": self.last_frame, "lost_since": self.lost_since,
                "state": self.state, "ended_frame": self.ended_frame, "merged_into": self.merged_into,
                "merged_ids": self.merged_ids, "revived_frames": self.revived_frames, "frames": self.frames}


@dataclass
class VideoSegmentation:
    """What `segment_video` found and wrote."""

    video: str  # source file name
    prompt: str
    frames: int  # frames processed and written (source frames / stride, capped by max_frames)
    size: tuple[int, int]  # (H, W)
    source_fps: float
    output_fps: float  # source_fps / frame_stride: the overlay lasts as long as the source
    tracks: list[Track]
    seed_frame: int | None  # first frame with a detection; None: nothing found anywhere
    codec: str  # overlay codec: "h264" or "mp4v"
    message: str
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the frame loop
    peak_gpu_memory_bytes: int | None = None  # torch.cuda.max_memory_allocated during the loop; None off CUDA
    frames_held_peak: int = 0  # most frames SAM 2's session held at once (bounded by its memory window)
    offload_frames: bool = False  # preprocessed frames were kept on the CPU
    offload_state: bool = False  # SAM 2's memory features were kept on the CPU

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        objects = ", ".join(f"#{track.object_id} {track.label}" for track in self.tracks) or "no objects"
        return (f"{self.video}: {self.frames} frames at {self.frames_per_second:.1f} frames/s, {objects}; "
                f"overlay {self.codec}. {self.message}")
