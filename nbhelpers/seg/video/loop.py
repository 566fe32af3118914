"""The video loop every backend shares: frames in, overlay MP4 and tracks.json out.

A backend brings a `VideoAdapter` (nbhelpers.seg.video.segment: GroundingDINO detection + SAM 2 tracking + the
identity rules; nbhelpers.seg.video.sam3_tracking: SAM 3's streaming session); `segment_with` does the rest:
reading and writing frames overlapped with the model, one retry with everything on the CPU after a GPU
out-of-memory error, the outputs (complete only when tracks.json and its completion record are written) and the
VideoSegmentation.

tracks.json, whatever the backend (the one description of its keys):
    video, prompt, frames, height, width, source_fps, output_fps, seed_frame: what was read; seed_frame is the
        first frame with a detection (null: nothing found)
    backend: the registry name (nbhelpers.seg.registry), e.g. "gdino-sam2" or "sam3"
    detector: what found new objects, e.g. "grounding-dino + clipseg fallback", "custom", "sam3 (every frame)"
    models: the loaded models' ids and backends, the video model's included
    thresholds: the DetectionSettings of the run
    video_settings: the VideoSettings fields the backend applies (SAM 3: frame_stride, max_frames, max_objects)
    codec, seconds, frames_per_second, peak_gpu_memory_bytes, frames_held_peak, offload_frames, offload_state,
        message: how the run went
    the backend's own keys (SAM 3: sam3_postprocessing, duplicates_removed)
    objects: one entry per Track (Track.to_json)
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from nbhelpers.platform import ensure_writable_dir, progress_bar
from nbhelpers.seg.export import encode_masks
from nbhelpers.seg.inputs import normalize_prompt, prompt_phrases
from nbhelpers.seg.render import overlay
from nbhelpers.seg.types import (OVERLAY_ALPHA, DetectionSettings, FrameMasks, Segmentation, Track, VideoSegmentation,
                                 VideoSettings)
from nbhelpers.seg.video.export import OVERLAY_FILE, IdMapWriter, begin_video_outputs, finish_video_outputs
from nbhelpers.seg.video.io import REENCODE_HINT, VideoInfo, VideoWriter, iter_frames, probe_video
from nbhelpers.seg.video.overlap import OrderedWorker, prefetch

Offload = tuple[bool, bool]  # (preprocessed frames on the CPU, the tracker's memory on the CPU)


class VideoOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory even with frames and the tracker's state offloaded to the CPU."""


class VideoPass(Protocol):
    """One pass over the video: who is who, frame by frame."""

    tracks: dict[int, Track]  # every object seen, by id
    seed_frame: int | None  # first frame with a detection
    objects_now: int  # objects in the tracker's session now (the progress bar shows it)
    frames_held_peak: int  # most frames the tracker's session held at once

    def step(self, frame: int, frame_rgb: np.ndarray) -> FrameMasks:
        """Detect (when due) and track on this frame; the tracks are recorded before it returns."""

    def notes(self) -> str:
        """Sentences added to the message after "N object(s) tracked; …" (revivals, merges, duplicates...)."""


class VideoAdapter(Protocol):
    """What a backend gives the loop: its tracker and what tracks.json says about it."""

    backend: str  # its registry name, recorded in tracks.json
    prompt: str  # the normalised prompt it reads
    tracker_name: str  # named in out-of-memory messages, e.g. "SAM 2"
    out_of_memory_advice: str  # what the user can change, e.g. "Use fewer objects (MAX_OBJECTS)"
    no_match_hint: str  # the settings that find more, e.g. "BOX_THRESHOLD / CLIPSEG_THRESHOLD"
    drawing_source: str  # Segmentation.source of the drawn frames, e.g. "sam2-video"
    video_fields: tuple[str, ...] | None  # the VideoSettings fields it applies (None: all)
    device: torch.device

    def start(self, info: VideoInfo, output_fps: float, offload: Offload,
              encode_mask: Callable[[np.ndarray], dict] | None) -> VideoPass:
        """A fresh pass (a retry after running out of memory starts another)."""

    def metadata(self, run: VideoPass) -> dict:
        """tracks.json keys of its own: "detector", "models" and any extra ones."""


def segment_with(make_adapter: Callable[[list[str]], VideoAdapter], video: str | os.PathLike,
                 prompt: str | Sequence[str], out_dir: str | os.PathLike, settings: DetectionSettings,
                 video_settings: VideoSettings, save_id_maps: bool = False, save_masks: bool = False,
                 offload: Offload = (False, False), alpha: float = OVERLAY_ALPHA, progress: bool = True) -> VideoSegmentation:
    """Run a backend's tracker through a video; write OUT/video_overlay.mp4, OUT/tracks.json[, OUT/id_maps/].

    Args:
        make_adapter: the prompt's phrases -> the backend's VideoAdapter (called after the video is probed).
        video, prompt, out_dir, settings, video_settings, save_id_maps, save_masks, alpha, progress: as for
            nbhelpers.seg.video.segment_video. offload: (frames, tracker state) on the CPU; an out-of-memory
            error retries once with both.
    Returns:
        VideoSegmentation; a video that stops decoding early keeps what was decoded, with a warning.
    """
    phrases = prompt_phrases(prompt)
    info = probe_video(video)
    out = ensure_writable_dir(Path(out_dir).expanduser(), "OUT_DIR")
    adapter = make_adapter(phrases)
    fps = output_fps(info, video_settings.frame_stride, video_settings.max_frames)
    encode = encode_track_mask if save_masks else None
    ((run, frames, seconds, peak, files, codec), offloaded) = with_offload_retry(
        lambda offloaded: run_frames(adapter.start(info, fps, offloaded, encode), adapter, info, out, video_settings,
                                     alpha, save_id_maps, progress),
        offload, adapter.tracker_name, adapter.out_of_memory_advice)
    warn_if_truncated(info, frames, expected_frames(info, video_settings.frame_stride, video_settings.max_frames))
    result = VideoSegmentation(
        video=info.path.name, prompt=adapter.prompt, frames=frames, size=(info.height, info.width),
        source_fps=info.fps, output_fps=fps, tracks=list(run.tracks.values()), seed_frame=run.seed_frame, codec=codec,
        message=_message(run, frames, adapter), files=files, seconds=seconds, peak_gpu_memory_bytes=peak,
        frames_held_peak=run.frames_held_peak, offload_frames=offloaded[0], offload_state=offloaded[1])
    metadata = tracks_metadata(result, adapter, run, settings, video_settings)
    result.files["tracks"] = finish_video_outputs(out, result.tracks, metadata)
    return result


def tracks_metadata(result: VideoSegmentation, adapter: VideoAdapter, run: VideoPass, settings: DetectionSettings,
                    video_settings: VideoSettings) -> dict:
    """tracks.json's keys before "objects" (see the module docstring)."""
    applied = video_settings.as_dict()
    if adapter.video_fields is not None:
        applied = {name: applied[name] for name in adapter.video_fields}
    return {"video": result.video, "prompt": result.prompt, "frames": result.frames, "height": result.size[0],
            "width": result.size[1], "source_fps": result.source_fps, "output_fps": result.output_fps,
            "seed_frame": result.seed_frame, "backend": adapter.backend} | adapter.metadata(run) | {
            "thresholds": settings.as_dict(), "video_settings": applied, "codec": result.codec,
            "seconds": round(result.seconds, 3), "frames_per_second": round(result.frames_per_second, 2),
            "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes, "frames_held_peak": result.frames_held_peak,
            "offload_frames": result.offload_frames, "offload_state": result.offload_state, "message": result.message}


def _message(run: VideoPass, frames: int, adapter: VideoAdapter) -> str:
    if run.seed_frame is None:
        return (f"no object matched {adapter.prompt!r} in any of the {frames} frames: the overlay is the plain video. "
                f"Lower {adapter.no_match_hint} or rephrase the prompt.")
    return f"{len(run.tracks)} object(s) tracked; first detection on frame {run.seed_frame}." + run.notes()


# ----------------------------------------------------------------------------- frames in, frames out


def run_frames(run: VideoPass, adapter: VideoAdapter, info: VideoInfo, out_dir: Path, settings: VideoSettings,
               alpha: float, save_id_maps: bool, progress: bool):
    """Stream the frames through `run` and write the overlay (and id maps); every output appears only if the pass
    completes.

    Returns:
        (run, frames processed, seconds, peak CUDA memory or None, {"overlay"[, "id_maps"]: path}, overlay codec).
    """
    fps = output_fps(info, settings.frame_stride, settings.max_frames)
    begin_video_outputs(out_dir)  # the outputs are replaced below: unfinished until finish_video_outputs
    id_maps = IdMapWriter(out_dir) if save_id_maps else None
    writer = VideoWriter(out_dir / OVERLAY_FILE, info.width, info.height, fps)
    device, size = adapter.device, (info.height, info.width)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames, start, worker = 0, time.perf_counter(), OrderedWorker()
    expected = expected_frames(info, settings.frame_stride, settings.max_frames)
    try:
        with progress_bar(total=expected, desc="video", unit="frame", disable=not progress) as bar:
            for frame, (_, frame_rgb) in enumerate(prefetch(iter_frames(info, settings.frame_stride, settings.max_frames))):
                result = run.step(frame, frame_rgb)
                drawing = tracks_drawing(run.tracks, frame, result, size, adapter.drawing_source)
                worker.submit(_write_frame, writer, id_maps, frame, frame_rgb, drawing, result, alpha)
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
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return run, frames, seconds, peak, files, writer.codec


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
    seg = Segmentation(boxes=boxes, scores=scores, labels=[f"#{t.object_id} {t.label}" for t in shown],
                       masks=result.masks[visible], mask_scores=np.full(len(ids), np.nan, np.float32), source=source,
                       image_size=size, prompt="")
    return seg, [object_id - 1 for object_id in ids]


def encode_track_mask(mask: np.ndarray) -> dict:
    """One (H, W) bool mask as tracks.json's RLE."""
    return encode_masks(mask[None])[0]


def _write_frame(writer: VideoWriter, id_maps: IdMapWriter | None, frame: int, frame_rgb: np.ndarray,
                 drawing: tuple[Segmentation, list[int]] | None, result: FrameMasks, alpha: float) -> None:
    """Draw and encode one frame (runs on the writer thread)."""
    writer.write(frame_rgb if drawing is None else overlay(frame_rgb, drawing[0], alpha=alpha, color_indices=drawing[1]))
    if id_maps is not None:
        id_maps.write(frame, result.object_ids, result.masks, frame_rgb.shape[:2])


def expected_frames(info: VideoInfo, stride: int, max_frames: int | None) -> int | None:
    """Frames the pass should process (None: the container does not say)."""
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


def warn_if_truncated(info: VideoInfo, frames: int, expected: int | None) -> None:
    if expected and frames < expected - 1:
        warnings.warn(f"{info.path.name}: the video ended after {frames} of {expected} frames (truncated or corrupt "
                      f"file?); the outputs cover the frames decoded. If it should be longer, copy it again or {REENCODE_HINT}.", stacklevel=4)


# ----------------------------------------------------------------------------- out of GPU memory


def free_cuda_memory() -> None:
    """Collect cycles holding dead tensors, then hand the cached GPU memory back (a full collection costs ~0.5 s)."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def with_offload_retry(run_pass: Callable[[Offload], object], offload: Offload, model_name: str, advice: str):
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
            if offloaded == (True, True):
                raise VideoOutOfMemoryError(
                    f"GPU out of memory even with frames and {model_name} state on the CPU. {advice}, "
                    "or a smaller video (`ffmpeg -i IN -vf scale=-2:720 OUT.mp4`).") from error
            warnings.warn(f"GPU out of memory: retrying once with frames and {model_name} state offloaded to the CPU.",
                          stacklevel=4)
        free_cuda_memory()  # out here, the error's traceback no longer holds the failed pass's tensors
    raise AssertionError("unreachable: the last attempt returns or raises")
