"""Text-prompted video segmentation: detect the prompt's objects, follow them with SAM 2, re-detect new ones.

Frames stream from disk one at a time; the overlay MP4 is written as frames come; SAM 2's state is pruned to
its memory window (nbhelpers.seg.video.tracking), so memory stays flat however long the video is.

    models = load_models(device=...)
    result = segment_video("clip.mp4", "a person. a dog", models, out_dir="outputs/q2_video",
                           video_settings=VideoSettings(redetect_every=15))

Who is who (new, revived, forgotten and merged objects) is decided in nbhelpers.seg.video.identity.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from nbhelpers.platform import select_runtime
from nbhelpers.seg.backends import GroundingDinoSam2Backend
from nbhelpers.seg.inputs import normalize_prompt
from nbhelpers.seg.models import LoadedModel, SegmentationModels, load_sam2_video
from nbhelpers.seg.types import DEFAULT_BACKEND, DetectionSettings, FrameDetections, FrameMasks, VideoSegmentation, VideoSettings
from nbhelpers.seg.video.identity import Identities
from nbhelpers.seg.video.io import VideoInfo
from nbhelpers.seg.video.loop import Offload, segment_with
from nbhelpers.seg.video.tracking import StreamingTracker

Detector = Callable[[np.ndarray], FrameDetections]  # frame RGB (H, W, 3) uint8 -> the objects on it


class _VideoRun:
    """State of one pass over the video: the detector, the SAM 2 session and who is who (Identities)."""

    def __init__(self, info: VideoInfo, detect: Detector, tracker: StreamingTracker, settings: VideoSettings,
                 output_fps: float, encode_mask: Callable[[np.ndarray], dict] | None):
        self.info, self.detect, self.tracker, self.settings = info, detect, tracker, settings
        self.identities = Identities(settings, output_fps, (info.height, info.width), encode_mask)
        self.tracks = self.identities.tracks
        self.seed_frame: int | None = None
        self.clipseg_ignored = 0  # CLIPSeg detections left out at re-detection frames

    def detection_due(self, frame: int) -> bool:
        if self.seed_frame is None:
            return True  # until the first detection, every frame is searched
        every = self.settings.redetect_every
        return every > 0 and frame > self.seed_frame and (frame - self.seed_frame) % every == 0

    def prompt_objects(self, frame: int, frame_rgb: np.ndarray) -> None:
        """Detect; revive lost objects and add new ones (nbhelpers.seg.video.identity decides which)."""
        found = self.detect(frame_rgb)
        if self.seed_frame is not None and found.source == "clipseg-fallback" and not self.settings.clipseg_redetect:
            self.clipseg_ignored += len(found.labels)  # its coarse regions would start phantom objects
            return
        if not len(found.labels):
            return
        prompts = self.identities.assign(frame, found, self.describer(frame, frame_rgb))
        if prompts.drop:
            self.tracker.remove_objects(prompts.drop)
        if prompts.ids:
            self.tracker.add_objects(frame, prompts.ids, prompts.boxes)
            self.seed_frame = frame if self.seed_frame is None else self.seed_frame

    def step(self, frame: int, frame_rgb: np.ndarray) -> FrameMasks:
        if self.detection_due(frame):
            self.prompt_objects(frame, frame_rgb)
        result = self.tracker.track(frame, frame_rgb)
        leaving = self.identities.record(frame, result, self.describer(frame, frame_rgb))
        if leaving:
            self.tracker.remove_objects(leaving)
        return result

    @property
    def objects_now(self) -> int:
        """Objects in the session now (the progress bar shows it)."""
        return len(self.identities.active)

    @property
    def frames_held_peak(self) -> int:
        return self.tracker.frames_held_peak

    def describer(self, frame: int, frame_rgb: np.ndarray):
        """Appearance descriptors of regions of this frame from the tracker's image features; None if it has none."""
        appearance = getattr(self.tracker, "appearance", None)  # test stand-ins may have none
        return None if appearance is None else lambda masks: appearance(frame, frame_rgb, masks)

    def notes(self) -> str:
        """Revivals, merges and forgotten objects, and detections left out for MAX_OBJECTS."""
        tracks, note = self.tracks.values(), ""
        counts = {"revived": sum(len(t.revived_frames) for t in tracks), "merged": sum(t.ended == "merged" for t in tracks),
                  "forgotten": sum(t.ended == "forgotten" for t in tracks)}
        if any(counts.values()):
            note += " " + ", ".join(f"{what} {count}" for what, count in counts.items()) + "."
        if self.identities.skipped_for_cap:
            note += (f" {self.identities.skipped_for_cap} detection(s) not added: MAX_OBJECTS="
                     f"{self.settings.max_objects} objects were visible at once.")
        return note


class Sam2VideoAdapter:
    """GroundingDINO + SAM 2 for the video loop: detection (every `redetect_every` frames), SAM 2 tracking and the
    identity rules (nbhelpers.seg.video.identity).

    Args:
        models: from load_models (GroundingDINO and CLIPSeg detect). phrases: the prompt's phrases.
        settings, video_settings: as for `segment_video`.
        sam_video: from load_sam2_video; None = the checkpoint of models.sam.
        detector: replaces GroundingDINO/CLIPSeg (frame RGB -> FrameDetections).
    """

    backend = DEFAULT_BACKEND
    tracker_name = "SAM 2"
    out_of_memory_advice = "Use a smaller SAM (SAM_MODEL='tiny'), fewer objects (MAX_OBJECTS)"
    no_match_hint = "BOX_THRESHOLD / CLIPSEG_THRESHOLD"
    drawing_source = "sam2-video"
    video_fields = None  # every VideoSettings field applies

    def __init__(self, models: SegmentationModels, phrases: list[str], settings: DetectionSettings,
                 video_settings: VideoSettings, sam_video: LoadedModel | None = None,
                 detector: Detector | None = None) -> None:
        if sam_video is None:
            sam_video = load_sam2_video(models.sam.model_id, select_runtime(str(models.sam.device), "auto", compile=False))
        self.models, self.sam_video, self.video_settings, self.custom = models, sam_video, video_settings, detector is not None
        self.detect = detector or _text_detector(GroundingDinoSam2Backend(models), phrases, settings)
        self.prompt, self.device = normalize_prompt(phrases), sam_video.device

    def start(self, info: VideoInfo, output_fps: float, offload: Offload,
              encode_mask: Callable[[np.ndarray], dict] | None) -> _VideoRun:
        tracker = StreamingTracker(self.sam_video, info.height, info.width, *offload)
        return _VideoRun(info, self.detect, tracker, self.video_settings, output_fps, encode_mask)

    def metadata(self, run: _VideoRun) -> dict:
        return {"detector": "custom" if self.custom else "grounding-dino + clipseg fallback",
                "models": self.models.describe() | {"sam_video_model": self.sam_video.model_id,
                                                    "sam_video_backend": self.sam_video.backend}}


def _text_detector(backend: GroundingDinoSam2Backend, phrases: list[str], settings: DetectionSettings) -> Detector:
    """The backend's detection (GroundingDINO, else CLIPSeg regions' boxes) as a Detector."""
    fitted = backend.fit_phrases(phrases)
    return lambda frame_rgb: backend.detect(frame_rgb, fitted, settings)


def segment_video(video: str | os.PathLike, prompt: str | Sequence[str], models: SegmentationModels,
                  out_dir: str | os.PathLike, sam_video: LoadedModel | None = None,
                  settings: DetectionSettings = DetectionSettings(), video_settings: VideoSettings = VideoSettings(),
                  save_id_maps: bool = False, save_masks: bool = False, offload_frames: bool = False,
                  offload_state: bool = False, alpha: float | None = None, detector: Detector | None = None,
                  progress: bool = True) -> VideoSegmentation:
    """Segment the prompt's objects through a video and write OUT/video_overlay.mp4 and OUT/tracks.json.

    Args:
        video: a video file. prompt: "a person. a dog", "cat, dog" or a list of phrases.
        models: from load_models (GroundingDINO and CLIPSeg detect; SAM 2 comes from `sam_video`).
        out_dir: output folder (created). sam_video: from load_sam2_video; None = the checkpoint of models.sam.
        settings: detection settings, as for images (multimask does not apply: SAM 2 video predicts one mask).
        video_settings: frame stride and cap, re-detection, objects at once, forgetting, merging (VideoSettings).
        save_id_maps: also write OUT/id_maps/NNNNNN.png (uint16 object ids). save_masks: RLE masks in tracks.json.
        offload_frames / offload_state: keep the preprocessed frames / SAM 2's memory on the CPU (less GPU memory,
            slower); after a GPU out-of-memory error the run is retried once with both on.
        alpha: mask opacity in the overlay; None = video_settings.overlay_alpha.
        detector: replaces GroundingDINO/CLIPSeg (frame RGB -> FrameDetections), e.g. for tests or other models.
    Returns:
        VideoSegmentation; `files` lists what was written. A video that stops decoding early keeps what was
        decoded, with a warning.
    """
    return segment_with(lambda phrases: Sam2VideoAdapter(models, phrases, settings, video_settings, sam_video, detector),
                        video, prompt, out_dir, settings, video_settings, save_id_maps, save_masks,
                        (offload_frames, offload_state), video_settings.overlay_alpha if alpha is None else alpha, progress)
