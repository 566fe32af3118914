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
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from nbhelpers.platform import ensure_writable_dir, select_runtime
from nbhelpers.seg.backends import as_backend
from nbhelpers.seg.export import encode_masks
from nbhelpers.seg.inputs import normalize_prompt, prompt_phrases
from nbhelpers.seg.models import LoadedModel, SegmentationModels, load_sam2_video
from nbhelpers.seg.render import overlay
from nbhelpers.seg.types import (DetectionSettings, FrameDetections, FrameMasks, Segmentation, Track,
                                 VideoSegmentation, VideoSettings)
from nbhelpers.seg.video.export import OVERLAY_FILE, IdMapWriter, begin_video_outputs, finish_video_outputs
from nbhelpers.seg.video.identity import Identities
from nbhelpers.seg.video.io import REENCODE_HINT, VideoInfo, VideoWriter, iter_frames, probe_video
from nbhelpers.seg.video.overlap import OrderedWorker, prefetch
from nbhelpers.seg.video.tracking import StreamingTracker

T = TypeVar("T")

Detector = Callable[[np.ndarray], FrameDetections]  # frame RGB (H, W, 3) uint8 -> the objects on it


class VideoOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory even with frames and SAM 2 state offloaded to the CPU."""


# ----------------------------------------------------------------------------- the frame loop


class _VideoRun:
    """State of one pass over the video: the detector, the SAM 2 session and who is who (Identities)."""

    def __init__(self, info: VideoInfo, detect: Detector, tracker: StreamingTracker, settings: VideoSettings,
                 output_fps: float, save_masks: bool):
        self.info, self.detect, self.tracker, self.settings = info, detect, tracker, settings
        self.identities = Identities(settings, output_fps, (info.height, info.width), encode_track_mask if save_masks else None)
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

    def describer(self, frame: int, frame_rgb: np.ndarray):
        """Appearance descriptors of regions of this frame from the tracker's image features; None if it has none."""
        appearance = getattr(self.tracker, "appearance", None)  # test stand-ins may have none
        return None if appearance is None else lambda masks: appearance(frame, frame_rgb, masks)

    def drawing(self, frame: int, result: FrameMasks) -> tuple[Segmentation, list[int]] | None:
        return tracks_drawing(self.tracks, frame, result, (self.info.height, self.info.width), "sam2-video")


def tracks_drawing(tracks: dict[int, Track], frame: int, result: FrameMasks, size: tuple[int, int], source: str
                   ) -> tuple[Segmentation, list[int]] | None:
    """What to draw on this frame: (Segmentation labelled "#id label", colour indices), None when nothing is visible.

    A snapshot: the tracks change while the writer thread draws. Every track seen on `frame` was recorded already
    (a track seen on it has it as its last frame).
    """
    visible = [i for i, object_id in enumerate(result.object_ids) if tracks[object_id].last_frame == frame]
    if not visible:
        return None
    ids = [result.object_ids[i] for i in visible]
    shown = [tracks[object_id] for object_id in ids]
    boxes = np.asarray([track.frames[-1]["box_xyxy"] for track in shown], np.float32)
    scores = np.asarray([track.score for track in shown], np.float32)
    seg = Segmentation(boxes, scores, [f"#{t.object_id} {t.label}" for t in shown], result.masks[visible],
                       np.full(len(ids), np.nan, np.float32), source, size, "")
    return seg, [object_id - 1 for object_id in ids]


def encode_track_mask(mask: np.ndarray) -> dict:
    return encode_masks(mask[None])[0]


def _write_frame(writer: VideoWriter, id_maps: IdMapWriter | None, frame: int, frame_rgb: np.ndarray,
                 drawing: tuple[Segmentation, list[int]] | None, result: FrameMasks, alpha: float) -> None:
    """Draw and encode one frame (runs on the writer thread)."""
    writer.write(frame_rgb if drawing is None else overlay(frame_rgb, drawing[0], alpha=alpha, color_indices=drawing[1]))
    if id_maps is not None:
        id_maps.write(frame, result.object_ids, result.masks, frame_rgb.shape[:2])


def expected_frames(info: VideoInfo, stride: int, max_frames: int | None) -> int | None:
    if not info.frame_count:
        return max_frames
    count = -(-info.frame_count // stride)
    return min(count, max_frames) if max_frames else count


def output_fps(info: VideoInfo, stride: int, max_frames: int | None) -> float:
    """Overlay frame rate that makes it last as long as the part of the source it covers.

    source fps / stride, except where the stride does not divide that part: 1 frame kept of a 2.5 s clip plays
    for 2.5 s, not for `stride` source frames.
    """
    if not info.frame_count:
        return info.fps / stride
    covered = min(info.frame_count, max_frames * stride) if max_frames else info.frame_count  # source frames
    return -(-covered // stride) * info.fps / covered


def _run_pass(info: VideoInfo, detect: Detector, sam_video: LoadedModel, out_dir: Path, settings: VideoSettings,
              save_masks: bool, alpha: float, save_id_maps: bool, offload: tuple[bool, bool], progress: bool):
    """One pass over the video; every output appears only if the pass completes."""
    fps = output_fps(info, settings.frame_stride, settings.max_frames)
    run = _VideoRun(info, detect, StreamingTracker(sam_video, info.height, info.width, *offload), settings, fps,
                    save_masks)
    return run_frames(run, info, sam_video.device, out_dir, settings, alpha, save_id_maps, progress)


def run_frames(run, info: VideoInfo, device: torch.device, out_dir: Path, settings: VideoSettings, alpha: float,
               save_id_maps: bool, progress: bool):
    """Stream the frames through `run` (its step(frame, rgb) -> FrameMasks, drawing(frame, masks), objects_now)
    and write the overlay (and id maps); every output appears only if the pass completes.

    Returns:
        (run, frames processed, seconds, peak CUDA memory or None, {"overlay"[, "id_maps"]: path}, overlay codec).
    """
    fps = output_fps(info, settings.frame_stride, settings.max_frames)
    begin_video_outputs(out_dir)  # the outputs are replaced below: unfinished until finish_video_outputs
    id_maps = IdMapWriter(out_dir) if save_id_maps else None
    writer = VideoWriter(out_dir / OVERLAY_FILE, info.width, info.height, fps)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    frames, start, worker = 0, time.perf_counter(), OrderedWorker()
    expected = expected_frames(info, settings.frame_stride, settings.max_frames)
    try:
        with tqdm(total=expected, desc="video", unit="frame", disable=not progress) as bar:
            for frame, (_, frame_rgb) in enumerate(prefetch(iter_frames(info, settings.frame_stride, settings.max_frames))):
                result = run.step(frame, frame_rgb)
                worker.submit(_write_frame, writer, id_maps, frame, frame_rgb, run.drawing(frame, result), result, alpha)
                frames += 1
                bar.set_postfix(objects=run.objects_now, refresh=False)
                bar.update()
            worker.finish()
    except BaseException:
        worker.cancel()
        writer.abort()
        if id_maps is not None:
            id_maps.abort()
        raise
    seconds = time.perf_counter() - start
    files = {"overlay": writer.close()} | ({"id_maps": id_maps.close()} if id_maps is not None else {})
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return run, frames, seconds, peak, files, writer.codec


def _message(run: _VideoRun, frames: int, prompt: str) -> str:
    if run.seed_frame is None:
        return (f"no object matched {prompt!r} in any of the {frames} frames: the overlay is the plain video. "
                f"Lower BOX_THRESHOLD / CLIPSEG_THRESHOLD or rephrase the prompt.")
    tracks = run.tracks.values()
    message = f"{len(run.tracks)} object(s) tracked; first detection on frame {run.seed_frame}."
    counts = {"revived": sum(len(t.revived_frames) for t in tracks), "merged": sum(t.ended == "merged" for t in tracks),
              "forgotten": sum(t.ended == "forgotten" for t in tracks)}
    if any(counts.values()):
        message += " " + ", ".join(f"{what} {count}" for what, count in counts.items()) + "."
    if run.identities.skipped_for_cap:
        message += (f" {run.identities.skipped_for_cap} detection(s) not added: MAX_OBJECTS="
                    f"{run.settings.max_objects} objects were visible at once.")
    return message


def warn_if_truncated(info: VideoInfo, frames: int, expected: int | None) -> None:
    if expected and frames < expected - 1:
        warnings.warn(f"{info.path.name}: the video ended after {frames} of {expected} frames (truncated or corrupt "
                      f"file?); the outputs cover the frames decoded. If it should be longer, copy it again or {REENCODE_HINT}.", stacklevel=3)


def _text_detector(models: SegmentationModels, phrases: list[str], settings: DetectionSettings) -> Detector:
    """The backend's detection (GroundingDINO, else CLIPSeg regions' boxes for the default one) as a Detector."""
    backend = as_backend(models)
    fitted = backend.fit_phrases(phrases)
    return lambda frame_rgb: backend.detect(frame_rgb, fitted, settings)


def free_cuda_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_offload_retry(run_pass: Callable[[tuple[bool, bool]], T], offload: tuple[bool, bool], model_name: str,
                       advice: str) -> tuple[T, tuple[bool, bool]]:
    """`run_pass((offload_frames, offload_state))`; after a GPU out-of-memory error, once more with both on the CPU.

    Args:
        advice: what the user can change, e.g. "Use fewer objects (MAX_OBJECTS)"; the message adds a smaller video.
    Returns:
        (what run_pass returned, the (offload_frames, offload_state) it ran with).
    Raises:
        VideoOutOfMemoryError: when even the offloaded pass runs out of GPU memory.
    """
    attempts = [offload] + ([(True, True)] if offload != (True, True) else [])
    for offloaded in attempts:
        try:
            return run_pass(offloaded), offloaded
        except torch.cuda.OutOfMemoryError as error:
            free_cuda_memory()
            if offloaded == (True, True):
                raise VideoOutOfMemoryError(
                    f"GPU out of memory even with frames and {model_name} state on the CPU. {advice}, "
                    "or a smaller video (`ffmpeg -i IN -vf scale=-2:720 OUT.mp4`).") from error
            warnings.warn(f"GPU out of memory: retrying once with frames and {model_name} state offloaded to the CPU.",
                          stacklevel=3)
    raise AssertionError("unreachable: the last attempt returns or raises")


def segment_video(video: str | os.PathLike, prompt: str | Sequence[str], models: SegmentationModels,
                  out_dir: str | os.PathLike, sam_video: LoadedModel | None = None,
                  settings: DetectionSettings = DetectionSettings(), video_settings: VideoSettings = VideoSettings(),
                  save_id_maps: bool = False, save_masks: bool = False, offload_frames: bool = False,
                  offload_state: bool = False, alpha: float = 0.5, detector: Detector | None = None,
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
        detector: replaces GroundingDINO/CLIPSeg (frame RGB -> FrameDetections), e.g. for tests or other models.
    Returns:
        VideoSegmentation; `files` lists what was written. A video that stops decoding early keeps what was
        decoded, with a warning.
    """
    phrases = prompt_phrases(prompt)
    info = probe_video(video)
    out = ensure_writable_dir(Path(out_dir).expanduser(), "OUT_DIR")
    if sam_video is None:
        sam_video = load_sam2_video(models.sam.model_id, select_runtime(str(models.sam.device), "auto", compile=False))
    detect = detector or _text_detector(models, phrases, settings)
    (run, frames, seconds, peak, files, codec), offloaded = with_offload_retry(
        lambda offloaded: _run_pass(info, detect, sam_video, out, video_settings, save_masks, alpha, save_id_maps,
                                    offloaded, progress),
        (offload_frames, offload_state), "SAM 2", "Use a smaller SAM (SAM_MODEL='tiny'), fewer objects (MAX_OBJECTS)")
    warn_if_truncated(info, frames, expected_frames(info, video_settings.frame_stride, video_settings.max_frames))
    prompt_text = normalize_prompt(phrases)
    result = VideoSegmentation(info.path.name, prompt_text, frames, (info.height, info.width), info.fps,
                               output_fps(info, video_settings.frame_stride, video_settings.max_frames),
                               list(run.tracks.values()), run.seed_frame, codec, _message(run, frames, prompt_text),
                               files, seconds, peak, run.tracker.frames_held_peak, *offloaded)
    metadata = _metadata(result, models, sam_video, video_settings, detector is None)
    result.files["tracks"] = finish_video_outputs(out, result.tracks, metadata)
    return result


def _metadata(result: VideoSegmentation, models: SegmentationModels, sam_video: LoadedModel,
              video_settings: VideoSettings, text_detection: bool) -> dict:
    return {"video": result.video, "prompt": result.prompt, "frames": result.frames, "height": result.size[0],
            "width": result.size[1], "source_fps": result.source_fps, "output_fps": result.output_fps,
            "seed_frame": result.seed_frame, **video_settings.as_dict(), "codec": result.codec, "backend": "gdino-sam2",
            "detector": "grounding-dino + clipseg fallback" if text_detection else "custom",
            "models": models.describe() | {"sam_video_model": sam_video.model_id, "sam_video_backend": sam_video.backend},
            "seconds": round(result.seconds, 3), "frames_per_second": round(result.frames_per_second, 2),
            "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes, "frames_held_peak": result.frames_held_peak,
            "offload_frames": result.offload_frames, "offload_state": result.offload_state, "message": result.message}
