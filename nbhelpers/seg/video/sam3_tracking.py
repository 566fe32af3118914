"""SAM 3 video: per-frame text detection and tracking in one model, streamed, with bounded state and no duplicates.

Sam3VideoModel detects every phrase on every frame and starts a track for each unmatched detection, so there is
no `redetect_every` for this backend. Two things are added around transformers' streaming session:

- Bounded memory. The session keeps every streamed frame's pixels and, per object, an output for every frame.
  The tracker reads back only the conditioning frames (prompted or re-conditioned: all kept, they are few), the
  last `num_maskmem - 1` frames' mask memory and up to `max_object_pointers_in_encoder` frames' object pointers,
  so everything older than that window is deleted after each frame (as the SAM 2 tracker does). Frame numbers
  are passed explicitly so that deleting entries does not renumber frames. A past frame's pixels are replaced by
  one shared empty tensor rather than deleted: the tracker reads the session's frame count (the length of
  `processed_frames`) to decide how many object pointers to use, so the count must keep growing.
- No duplicate tracks. Without the optional `kernels` package transformers skips SAM 3's detection NMS, and
  several overlapping detections of one object each start a track. A new track whose mask overlaps a track of
  the same phrase on its first frame by more than `nms_iou` is removed from the session and never reported.
  The overlap is measured on SAM 3's raw low-resolution masks: its post-processing gives each pixel to one
  object, so a duplicate's final mask is empty and could not be compared.

SAM 3's own post-processing (detection NMS, hole filling, sprinkle removal) runs only when transformers loads
the `kernels-community/cv-utils` kernel from the hub through the `kernels` package; otherwise transformers skips
it with a warning on stderr. `sam3_postprocessing` makes that load attempt quietly before a run and says what
runs; the run prints it as one line and records it in tracks.json.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from nbhelpers.seg.inputs import TextLimit, fit_phrases, normalize_prompt
from nbhelpers.seg.models import LoadedModel, Sam3Models, text_token_limit
from nbhelpers.seg.types import DetectionSettings, FrameMasks, Track, VideoSegmentation, VideoSettings
from nbhelpers.seg.video.io import VideoInfo
from nbhelpers.seg.video.loop import segment_with


_DROPPED_FRAME = torch.empty(0)  # stands for a streamed frame whose pixels were freed (one object for all of them)

POSTPROCESSING_STEPS = "NMS, hole filling, sprinkle removal"
_last_failure: list[str] = []  # why the kernel failed to load, as captured from the attempt (at most one entry)
_noted: list[str] = []  # the skipped-post-processing note, once printed in this process


@dataclass(frozen=True)
class Sam3PostProcessing:
    """What transformers' SAM 3 video post-processing does in this process."""

    runs: bool  # the cv-utils kernel loaded: NMS, hole filling and sprinkle removal run
    description: str  # POSTPROCESSING_STEPS, or "skipped: <why>"

    def note(self) -> str | None:
        """One line for the user when the post-processing is skipped (None when it runs)."""
        if self.runs:
            return None
        return (f"[nbhelpers] SAM 3 video post-processing {self.description}: duplicate tracks may appear (new tracks "
                f"overlapping one of the same phrase by more than NMS_IOU are dropped) and masks are not hole-filled. "
                f"To enable it: install `kernels` (pip install kernels) and run with internet access, so that "
                f"transformers can fetch kernels-community/cv-utils from the hub.")


@contextlib.contextmanager
def _captured_logs(*names: str) -> Iterator[list[str]]:
    """Collect the WARNING+ records of these loggers instead of letting them reach stderr (restored after)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, saved = Collect(logging.WARNING), []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate, logger.level))
        logger.addHandler(handler)
        logger.propagate, logger.level = False, logging.WARNING  # seen even at transformers' error verbosity
    try:
        yield messages
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level


def _short_reason(messages: list[str]) -> str:
    """The first sentence of the load error in transformers' "Failed to load cv_utils kernel (...): ERROR. NMS ..."."""
    failed = [message for message in messages if "cv_utils kernel" in message] or messages
    if not failed:
        return "see transformers' warning"
    text = re.sub(r"^Failed to load cv_utils kernel \([^)]*\):\s*", "", failed[-1])
    text = text.split(". NMS post-processing")[0]
    return re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")[:200]


def sam3_postprocessing() -> Sam3PostProcessing:
    """Make transformers' one load attempt of SAM 3 video's cv-utils kernel now, quietly, and say what runs.

    transformers records the attempt in `modeling_sam3_video.cv_utils_kernel` (None: not attempted, False: failed,
    else the kernel); its warnings (and the `kernels` package's) are captured here instead of printed. Offline the
    attempt fails at once (measured: 0.04 s, the hub's address does not resolve; 0.006 s with HF_HUB_OFFLINE=1).
    Returns:
        Sam3PostProcessing: runs (the kernel loaded) and a description for metadata files.
    """
    from transformers.models.sam3_video import modeling_sam3_video as sam3_video

    if not hasattr(sam3_video, "_load_cv_utils_kernel_once"):  # transformers' own detail (checked on 5.24-5.25)
        return Sam3PostProcessing(runs=False, description="unknown: this transformers version loads no cv-utils kernel "
                                                          "the way 5.24-5.25 do")
    if sam3_video.cv_utils_kernel is None:
        with _captured_logs(sam3_video.logger.name, "kernels") as messages:
            sam3_video._load_cv_utils_kernel_once()
        _last_failure[:] = [] if sam3_video.cv_utils_kernel else [_short_reason(messages)]
    if sam3_video.cv_utils_kernel:
        return Sam3PostProcessing(runs=True, description=POSTPROCESSING_STEPS)
    if not sam3_video.is_kernels_available():
        return Sam3PostProcessing(runs=False, description="skipped: kernels package not installed")
    reason = _last_failure[0] if _last_failure else "see transformers' warning"
    return Sam3PostProcessing(runs=False, description=f"skipped: cv-utils kernel could not be loaded ({reason})")


def report_sam3_postprocessing() -> Sam3PostProcessing:
    """`sam3_postprocessing()`, printing its note (on stdout, once per process) when the post-processing is skipped."""
    status = sam3_postprocessing()
    note = status.note()
    if note is not None and note not in _noted:
        _noted[:] = [note]
        print(note, file=sys.stdout, flush=True)
    return status


# transformers' SAM 3 video logs "hitting self.max_num_objects ..." on every frame that detects more objects than it
# may track: the tracker counts those records instead (one printed line at the end, and tracks.json).
SAM3_VIDEO_LOGGER = "transformers.models.sam3_video.modeling_sam3_video"
_CAPPED_PREFIX = "hitting self.max_num_objects"


class CappedFrames(logging.Filter):
    """Drops SAM 3 video's per-frame "hitting self.max_num_objects" record and counts it; passes every other.
    Attach it with `counting(...)` around a model call."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_CAPPED_PREFIX):
            self.frames += 1
            return False
        return True

    @contextlib.contextmanager
    def counting(self) -> Iterator["CappedFrames"]:
        """Within the block, SAM 3 video's capped-objects records are counted here instead of shown."""
        logger = logging.getLogger(SAM3_VIDEO_LOGGER)
        logger.addFilter(self)
        try:
            yield self
        finally:
            logger.removeFilter(self)

    def note(self, max_objects: int) -> str | None:
        """The one line for the user, or None when no frame was capped."""
        if not self.frames:
            return None
        return (f"[nbhelpers] SAM 3 video: on {self.frames} frame(s) it detected more objects than MAX_OBJECTS="
                f"{max_objects} and did not track the extra ones (raise MAX_OBJECTS to follow more).")


def _mask_iou(mask: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (H, W) bool mask with each of (K, H, W)."""
    inter = (others & mask).sum(axis=(1, 2))
    union = (others | mask).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


class Sam3StreamingTracker:
    """One Sam3Video streaming session over the video's frames.

    Args:
        sam3_video: from nbhelpers.seg.models.load_sam3_video. phrases: one text prompt each.
        height, width: the video's frame size (px).
        settings: `sam3_threshold` (detection score) and `nms_iou` (duplicate-track overlap).
        max_objects: most tracks SAM 3 keeps (its `max_num_objects`).
        offload_frames / offload_state: keep the frames / the tracker's memory on the CPU.
        prune: delete state older than the memory window (False only to check that pruning changes nothing).
    """

    def __init__(self, sam3_video: LoadedModel, phrases: list[str], height: int, width: int,
                 settings: DetectionSettings, max_objects: int = 20, offload_frames: bool = False,
                 offload_state: bool = False, prune: bool = True):
        self.loaded, self.size, self.nms_iou, self.pruning = sam3_video, (int(height), int(width)), settings.nms_iou, prune
        model, device, cpu = sam3_video.model, sam3_video.device, torch.device("cpu")
        # thresholds of this run; the checkpoint's new-track threshold (new_det_thresh) stays as configured
        model.score_threshold_detection, model.max_num_objects = settings.sam3_threshold, max_objects
        self.session = sam3_video.processor.init_video_session(
            inference_device=device, inference_state_device=cpu if offload_state else device,
            video_storage_device=cpu if offload_frames else device, dtype=sam3_video.dtype)
        sam3_video.processor.add_text_prompt(self.session, phrases)
        tracker = model.config.tracker_config
        self.memory_window = max(tracker.num_maskmem, tracker.max_object_pointers_in_encoder) + 1
        self.labels: dict[int, str] = {}  # SAM 3 object id -> phrase, for every track reported
        self.duplicates: list[int] = []  # SAM 3 object ids removed as duplicates
        self.capped = CappedFrames()  # frames on which SAM 3 found more objects than max_objects
        self.frames_held_peak = 0

    @torch.inference_mode()
    def track(self, frame_index: int, frame_rgb: np.ndarray) -> tuple[FrameMasks, list[tuple[int, str, float]]]:
        """Detect and track on this frame (indices increase by one per call).

        Returns:
            (FrameMasks with ids = SAM 3 id + 1, new tracks started here as (id, phrase, detection score)).
        """
        assert frame_rgb.shape[:2] == self.size, f"frame {frame_rgb.shape[:2]} != video size {self.size}"
        processor = self.loaded.processor
        pixels = processor(images=frame_rgb, return_tensors="pt").pixel_values[0]
        with self.capped.counting():
            output = self.loaded.model(inference_session=self.session, frame=pixels, frame_idx=frame_index)
        found = processor.postprocess_outputs(self.session, output, original_sizes=[list(self.size)])
        ids = [int(i) for i in found["object_ids"]]
        masks = found["masks"].cpu().numpy().astype(bool).reshape(len(ids), *self.size)
        scores = found["scores"].float().cpu().numpy().reshape(len(ids))
        phrase_of = {int(i): phrase for phrase, members in found["prompt_to_obj_ids"].items() for i in members}
        raw = {int(key): (value.reshape(value.shape[-2:]) > 0).cpu().numpy() for key, value in output.obj_id_to_mask.items()}
        keep, new = self._drop_duplicates(ids, raw, scores, phrase_of)
        if self.pruning:
            self.prune(frame_index)
        self.frames_held_peak = max(self.frames_held_peak, self.frames_held())
        result = FrameMasks([ids[i] + 1 for i in keep], masks[keep], scores[keep])
        return result, [(ids[i] + 1, phrase_of[ids[i]], float(scores[i])) for i in new]

    def _drop_duplicates(self, ids: list[int], raw: dict[int, np.ndarray], scores: np.ndarray,
                         phrase_of: dict[int, str]) -> tuple[list[int], list[int]]:
        """Rows to report and the new tracks among them; new tracks overlapping a kept one of their phrase go.

        Args:
            raw: SAM 3 id -> its low-resolution (h, w) bool mask before post-processing.
        """
        empty = np.zeros(next(iter(raw.values())).shape if raw else (1, 1), bool)
        masks = np.stack([raw.get(obj, empty) for obj in ids]) if ids else empty[None]
        keep = [i for i, obj in enumerate(ids) if obj in self.labels]
        fresh = sorted((i for i, obj in enumerate(ids) if obj not in self.labels and obj not in self.duplicates),
                       key=lambda i: -scores[i])
        new = []
        for i in fresh:
            same = [j for j in keep if phrase_of.get(ids[j]) == phrase_of[ids[i]]]
            if same and masks[i].any() and _mask_iou(masks[i], masks[same]).max() > self.nms_iou:
                self._remove(ids[i])
                continue
            keep.append(i)
            new.append(i)
            self.labels[ids[i]] = phrase_of[ids[i]]
        return sorted(keep), new

    def _remove(self, object_id: int) -> None:
        """Take a duplicate out of the session, so it costs no more tracking and never comes back."""
        session = self.session
        session.remove_object(object_id)
        session.obj_id_to_score[object_id] = -1e4  # what transformers does for the tracks it removes itself
        session.obj_id_to_last_occluded.pop(object_id, None)
        session.removed_obj_ids.add(object_id)
        self.duplicates.append(object_id)

    def prune(self, frame_index: int) -> None:
        """Delete the frames and per-frame outputs SAM 3 will not read again (see the module docstring)."""
        session, oldest = self.session, frame_index - self.memory_window
        for key in [key for key in (session.processed_frames or {}) if key < frame_index]:
            session.processed_frames[key] = _DROPPED_FRAME
        per_frame = [outputs["non_cond_frame_outputs"] for outputs in session.output_dict_per_obj.values()]
        per_frame += list(session.frames_tracked_per_obj.values()) + list(session.mask_inputs_per_obj.values())
        per_frame += [session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids]
        for stored in per_frame:
            for key in [key for key in stored if key < oldest]:
                del stored[key]
        for frames in list(session.unmatched_frame_inds.values()) + list(session.overlap_pair_to_frame_inds.values()):
            frames[:] = [frame for frame in frames if frame >= oldest]

    def frames_held(self) -> int:
        """How many distinct frames the session still holds pixels or per-frame state for."""
        session = self.session
        held = {key for key, pixels in (session.processed_frames or {}).items() if pixels is not _DROPPED_FRAME}
        held |= set(session.obj_id_to_tracker_score_frame_wise)
        for outputs in session.output_dict_per_obj.values():
            held |= set(outputs["non_cond_frame_outputs"]) | set(outputs["cond_frame_outputs"])
        for tracked in session.frames_tracked_per_obj.values():
            held |= set(tracked)
        return len(held)


class _Sam3Run:
    """Tracks of one pass over SAM 3's session (a VideoPass of nbhelpers.seg.video.loop)."""

    def __init__(self, tracker: Sam3StreamingTracker, encode_mask: Callable[[np.ndarray], dict] | None):
        self.tracker, self.encode_mask = tracker, encode_mask
        self.tracks: dict[int, Track] = {}
        self.seed_frame: int | None = None

    def step(self, frame: int, frame_rgb: np.ndarray) -> FrameMasks:
        result, new = self.tracker.track(frame, frame_rgb)
        for object_id, label, score in new:
            self.tracks[object_id] = Track(object_id, label, score, "sam3", frame)
            self.seed_frame = frame if self.seed_frame is None else self.seed_frame
        masks = dict(zip(result.object_ids, result.masks))
        for object_id, track in self.tracks.items():
            track.record(frame, masks.get(object_id), self.encode_mask)
        return result

    @property
    def objects_now(self) -> int:
        """Objects in SAM 3's session now (the progress bar shows it)."""
        return len(self.tracker.session.obj_ids)

    @property
    def frames_held_peak(self) -> int:
        return self.tracker.frames_held_peak

    def notes(self) -> str:
        duplicates = len(self.tracker.duplicates)
        return f" {duplicates} duplicate track(s) removed." if duplicates else ""


class Sam3VideoAdapter:
    """SAM 3 video for the video loop: its streaming session detects every phrase on every frame and keeps its own
    identities, so of VideoSettings only frame_stride, max_frames and max_objects apply.

    Args:
        models: from load_sam3_models (the video model loads here, once). phrases: the prompt's phrases (each cut
            to the video model's text limit). settings: `sam3_threshold` (detection score minimum) and `nms_iou`
            (duplicate-track overlap). video_settings: max_objects is SAM 3's `max_num_objects`.
    """

    backend = "sam3"
    tracker_name = "SAM 3"
    out_of_memory_advice = ("Use fewer objects (MAX_OBJECTS), fewer phrases, a higher SAM3_THRESHOLD (fewer detections "
                            "per frame: transformers compares the masks of every pair of them)")
    no_match_hint = "SAM3_THRESHOLD"
    drawing_source = "sam3-video"
    video_fields = ("frame_stride", "max_frames", "max_objects", "overlay_alpha")

    def __init__(self, models: Sam3Models, phrases: list[str], settings: DetectionSettings,
                 video_settings: VideoSettings) -> None:
        self.models, self.settings, self.max_objects = models, settings, video_settings.max_objects
        self.sam3_video = models.video()
        tokenizer = self.sam3_video.processor.tokenizer  # the video model reads the text itself
        self.phrases = fit_phrases(phrases, [TextLimit("SAM 3 video", tokenizer, text_token_limit(self.sam3_video))])
        self.prompt, self.device = normalize_prompt(self.phrases), self.sam3_video.device
        self.postprocessing = report_sam3_postprocessing()  # before the first frame, where transformers would warn

    def start(self, info: VideoInfo, output_fps: float, offload: tuple[bool, bool],
              encode_mask: Callable[[np.ndarray], dict] | None) -> _Sam3Run:
        tracker = Sam3StreamingTracker(self.sam3_video, self.phrases, info.height, info.width, self.settings,
                                       self.max_objects, *offload)
        return _Sam3Run(tracker, encode_mask)

    def metadata(self, run: _Sam3Run) -> dict:
        note = run.tracker.capped.note(self.max_objects)
        if note:
            print(note, flush=True)
        return {"detector": "sam3 (every frame)", "frames_over_max_objects": run.tracker.capped.frames,
                "models": self.models.describe() | {"sam3_video_backend": self.sam3_video.backend},
                "sam3_postprocessing": self.postprocessing.description,
                "duplicates_removed": len(run.tracker.duplicates)}


def segment_video_sam3(video: str | os.PathLike, prompt: str | Sequence[str], models: Sam3Models,
                       out_dir: str | os.PathLike, settings: DetectionSettings = DetectionSettings(),
                       video_settings: VideoSettings = VideoSettings(), save_id_maps: bool = False,
                       save_masks: bool = False, offload_frames: bool = False, offload_state: bool = False,
                       alpha: float | None = None, progress: bool = True) -> VideoSegmentation:
    """SAM 3's `segment_video`: the same loop and outputs (video_overlay.mp4, tracks.json, id maps), new objects
    found by SAM 3's own per-frame detection. Options as in nbhelpers.seg.video.segment_video; of `video_settings`
    only frame_stride, max_frames, max_objects and overlay_alpha apply (SAM 3 detects on every frame and keeps its
    own identities). `settings.sam3_threshold` is the detection score minimum and `settings.nms_iou` the
    duplicate-track overlap.
    """
    return segment_with(lambda phrases: Sam3VideoAdapter(models, phrases, settings, video_settings), video, prompt,
                        out_dir, settings, video_settings, save_id_maps, save_masks, (offload_frames, offload_state),
                        video_settings.overlay_alpha if alpha is None else alpha, progress)
