"""Video segmentation with the tiny random models on synthetic clips (moving shapes, generated in the tests)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from nbhelpers.seg.models import load_sam2_video
from nbhelpers.seg.types import DetectionSettings, FrameDetections, FrameMasks, VideoSettings
from nbhelpers.seg.video import VideoError, load_tracks, segment_video
from nbhelpers.seg.video import segment as video_module
from nbhelpers.seg.video.tracking import StreamingTracker
from nbhelpers.testing import make_test_frame, make_test_video

COLOURS = {"square": lambda f: (f[..., 0] > 160) & (f[..., 2] < 100), "circle": lambda f: (f[..., 2] > 160) & (f[..., 0] < 100)}


def colour_regions(frame: np.ndarray) -> dict[str, np.ndarray]:
    """The synthetic clip's shapes found by colour: label -> (H, W) bool (only those present)."""
    frame = frame.astype(np.int16)
    return {label: mask for label, test in COLOURS.items() if (mask := test(frame)).sum() > 10}


def scripted_detector(frame: np.ndarray) -> FrameDetections:
    """A detector that finds the clip's shapes by colour. Random GroundingDINO weights cannot be made to find
    a particular shape, so tests about *which* object is found use this instead (the issue allows it)."""
    regions = colour_regions(frame)
    boxes = []
    for mask in regions.values():
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return FrameDetections(np.asarray(boxes, np.float32).reshape(-1, 4), np.ones(len(boxes), np.float32),
                           list(regions), "scripted")


@pytest.fixture(scope="module")
def sam_video(tiny_seg_model_dirs):
    return load_sam2_video(tiny_seg_model_dirs["sam"])


def _mp4_frames(path: Path) -> tuple[int, float, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    fps, size = capture.get(cv2.CAP_PROP_FPS), (int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    capture.release()
    return count, fps, size


def test_frames_in_equal_frames_out_with_same_size_and_fps(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=18, height=48, width=64, fps=15.0)
    result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, save_id_maps=True, progress=False,
                           video_settings=VideoSettings(redetect_every=0))  # random SAM masks: no re-detection
    count, fps, size = _mp4_frames(result.files["overlay"])
    assert (count, fps, size) == (18, 15.0, (48, 64))
    assert result.frames == 18 and result.codec == "h264"
    assert sorted(p.name for p in result.files["id_maps"].iterdir()) == [f"{i:06d}.png" for i in range(18)]
    id_map = cv2.imread(str(result.files["id_maps"] / "000005.png"), cv2.IMREAD_UNCHANGED)
    assert id_map.dtype == np.uint16 and id_map.shape == (48, 64) and set(np.unique(id_map)) <= {0, 1}
    tracks = load_tracks(result.files["tracks"])
    assert tracks["frames"] == 18 and tracks["source_fps"] == 15.0 and tracks["output_fps"] == 15.0
    assert [(o["id"], o["label"], o["first_frame"]) for o in tracks["objects"]] == [(1, "square", 0)]


def test_ids_stay_the_same_across_frames(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=16, height=48, width=64)
    result = segment_video(clip, "square. circle", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, save_masks=True, progress=False,
                           video_settings=VideoSettings(redetect_every=0))
    tracks = load_tracks(result.files["tracks"])
    assert [o["id"] for o in tracks["objects"]] == [1]
    square = tracks["objects"][0]
    frames = [entry["frame"] for entry in square["frames"]]
    assert frames == sorted(set(frames)) and frames[0] == 0 and all("mask_rle" in entry for entry in square["frames"])
    assert square["last_frame"] == frames[-1]


def test_stride_and_max_frames_keep_the_duration(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=20, height=48, width=64, fps=12.0)
    result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, progress=False,
                           video_settings=VideoSettings(frame_stride=3, max_frames=5))
    count, fps, _ = _mp4_frames(result.files["overlay"])
    assert (count, fps, result.output_fps) == (5, 4.0, 4.0)


def test_stride_longer_than_the_video_keeps_the_duration(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    # 30 frames at 12 fps last 2.5 s; a stride of 100 keeps one frame, which must then play for 2.5 s
    # (at 12/100 fps it would play for 8.3 s).
    clip = make_test_video(tmp_path / "clip.mp4", frames=30, height=48, width=64, fps=12.0)
    result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, progress=False, video_settings=VideoSettings(frame_stride=100))
    count, fps, _ = _mp4_frames(result.files["overlay"])
    assert count == 1 and result.frames / result.output_fps == pytest.approx(2.5)
    assert count / fps == pytest.approx(2.5, abs=0.05)
    # Stride 4 keeps frames 0, 4, …, 28: 8 frames that must cover the 2.5 s too (at 12/4 fps: 2.67 s).
    result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, progress=False, video_settings=VideoSettings(frame_stride=4))
    assert result.frames == 8 and result.frames / result.output_fps == pytest.approx(2.5)


class ColourTracker:
    """Stands in for SAM 2 in the re-detection test: a trained SAM 2 cannot exist here (no weights can be
    downloaded) and random SAM weights return masks unrelated to the prompt box. This tracker returns, for
    each tracked id, the colour region of the label it was prompted with — a perfect tracker."""

    def __init__(self, sam_video, height, width, offload_frames=False, offload_state=False):
        self.labels: dict[int, str] = {}
        self.frames_held_peak = 1

    def add_objects(self, frame_index, object_ids, boxes_xyxy):
        frame = make_test_frame(frame_index, 48, 64, enter_frame=12)
        regions = colour_regions(frame)
        for object_id, box in zip(object_ids, boxes_xyxy):
            x0, y0, x1, y1 = box.astype(int)
            self.labels[object_id] = next(label for label, mask in regions.items() if mask[y0:y1, x0:x1].any())

    def remove_objects(self, object_ids):
        for object_id in object_ids:
            del self.labels[object_id]

    def track(self, frame_index, frame_rgb):
        regions = colour_regions(frame_rgb)
        masks = [regions.get(label, np.zeros(frame_rgb.shape[:2], bool)) for label in self.labels.values()]
        return FrameMasks(list(self.labels), np.asarray(masks, bool).reshape(-1, *frame_rgb.shape[:2]),
                          np.ones(len(masks), np.float32))


def test_object_entering_mid_clip_gets_a_new_id(tiny_seg_models, sam_video, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(video_module, "StreamingTracker", ColourTracker)
    clip = make_test_video(tmp_path / "clip.mp4", frames=24, height=48, width=64, enter_frame=12)
    result = segment_video(clip, "square. circle", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, video_settings=VideoSettings(redetect_every=5), progress=False)
    summary = [(t.object_id, t.label, t.first_frame) for t in result.tracks]
    # Re-detections at 5, 10, 15, 20: the square overlaps its own track (no duplicate); the disc, in from 12,
    # is new at the first re-detection after it entered.
    assert summary == [(1, "square", 0), (2, "circle", 15)]
    assert result.tracks[1].frames[0]["frame"] == 15 and result.tracks[0].last_frame == 23


def test_without_redetection_a_late_object_is_not_added(tiny_seg_models, sam_video, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(video_module, "StreamingTracker", ColourTracker)
    clip = make_test_video(tmp_path / "clip.mp4", frames=20, height=48, width=64, enter_frame=12)
    result = segment_video(clip, "square. circle", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, video_settings=VideoSettings(redetect_every=0), progress=False)
    assert [t.label for t in result.tracks] == ["square"]


def test_real_tiny_sam_with_redetection_keeps_ids_and_labels(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=20, height=48, width=64, enter_frame=8)
    result = segment_video(clip, "square. circle", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, video_settings=VideoSettings(redetect_every=5), progress=False)
    ids = [t.object_id for t in result.tracks]
    assert ids == list(range(1, len(ids) + 1)) and result.tracks[0].label == "square"
    circles = [t for t in result.tracks if t.label == "circle"]
    assert circles and circles[0].first_frame == 10  # first re-detection after the disc entered at 8
    assert all(entry["frame"] >= t.first_frame for t in result.tracks for entry in t.frames)


def test_grounding_dino_path_end_to_end(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=6, height=48, width=64)
    result = segment_video(clip, "a cat", tiny_seg_models, tmp_path / "out", sam_video=sam_video, progress=False,
                           video_settings=VideoSettings(max_objects=3), settings=DetectionSettings(box_threshold=0.05))
    assert result.seed_frame == 0 and 1 <= len(result.tracks) <= 3
    assert {t.source for t in result.tracks} == {"grounding-dino"} and {t.label for t in result.tracks} == {"a cat"}


def test_clipseg_fallback_seeds_when_grounding_dino_finds_nothing(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=4, height=48, width=64)
    # box_threshold=1.0 can never be exceeded by a sigmoid score; CLIPSeg at 0 takes every pixel.
    result = segment_video(clip, "a cat", tiny_seg_models, tmp_path / "out", sam_video=sam_video, progress=False, settings=DetectionSettings(box_threshold=1.0, clipseg_threshold=0.0))
    assert [t.source for t in result.tracks] == ["clipseg-fallback"]


def test_nothing_found_writes_the_plain_video_and_says_so(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=6, height=48, width=64)
    result = segment_video(clip, "a cat", tiny_seg_models, tmp_path / "out", sam_video=sam_video, progress=False, settings=DetectionSettings(box_threshold=1.0, clipseg_threshold=1.0))
    assert result.tracks == [] and result.seed_frame is None and "plain video" in result.message
    assert _mp4_frames(result.files["overlay"])[0] == 6
    tracks = load_tracks(result.files["tracks"])
    assert tracks["objects"] == [] and "plain video" in tracks["message"]


def test_one_frame_video(tiny_seg_models, sam_video, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "one.mp4", frames=1, height=48, width=64)
    result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                           detector=scripted_detector, progress=False)
    assert result.frames == 1 and _mp4_frames(result.files["overlay"])[0] == 1


class UnprunedTracker(StreamingTracker):
    def prune(self, frame_index: int) -> None:  # keep everything, as transformers does by itself
        self.frames_held_peak = max(self.frames_held_peak, self.frames_held())


def test_pruning_bounds_the_state_and_changes_no_mask(sam_video) -> None:
    frames = [make_test_frame(i, 48, 64, enter_frame=10) for i in range(40)]
    runs = []
    for tracker in (StreamingTracker(sam_video, 48, 64), UnprunedTracker(sam_video, 48, 64)):
        masks = []
        for index, frame in enumerate(frames):
            if index in (0, 12):  # a second object added mid-stream too
                tracker.add_objects(index, [len(tracker.object_ids) + 1], scripted_detector(frame).boxes[-1:])
            masks.append(tracker.track(index, frame).masks)
        runs.append((masks, tracker.frames_held_peak))
    (pruned, pruned_peak), (full, full_peak) = runs
    assert all(np.array_equal(a, b) for a, b in zip(pruned, full))
    config = sam_video.model.config
    window = max(config.num_maskmem, config.max_object_pointers_in_encoder) + 1
    # 40 frames, well past the window: unpruned, the session holds every frame; pruned, only the window, the
    # current frame and the two prompted (conditioning) frames 0 and 12.
    assert full_peak == 40 and pruned_peak <= window + 1 + 2, f"pruned session held {pruned_peak} frames (window {window})"


def test_out_of_memory_retries_once_offloaded_then_explains(tiny_seg_models, sam_video, tmp_path: Path,
                                                            monkeypatch) -> None:
    # A GPU cannot exist here, so its out-of-memory error is raised by a patched tracker.
    attempts = []

    class OutOfMemoryTracker(StreamingTracker):
        def __init__(self, *args, offload_frames=False, **kwargs):
            super().__init__(*args, offload_frames=offload_frames, **kwargs)
            attempts.append(offload_frames)
            self.fail = offload_frames is False or fail_offloaded

        def track(self, frame_index, frame_rgb):
            if self.fail and frame_index == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().track(frame_index, frame_rgb)

    monkeypatch.setattr(video_module, "StreamingTracker", lambda *a, **k: OutOfMemoryTracker(
        a[0], a[1], a[2], offload_frames=a[3], offload_state=a[4]))
    clip = make_test_video(tmp_path / "clip.mp4", frames=5, height=48, width=64)
    fail_offloaded = False
    with pytest.warns(UserWarning, match="retrying once"):
        result = segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                               detector=scripted_detector, progress=False)
    assert attempts == [False, True] and result.offload_frames and result.offload_state and result.frames == 5
    assert load_tracks(result.files["tracks"])["offload_state"] is True
    fail_offloaded, attempts[:] = True, []
    before = (tmp_path / "out" / "video_overlay.mp4").read_bytes()
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="even with frames and SAM 2 state on the CPU"):
        segment_video(clip, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                      detector=scripted_detector, progress=False)
    assert attempts == [False, True] and (tmp_path / "out" / "video_overlay.mp4").read_bytes() == before
    assert not list((tmp_path / "out").glob(".*partial*"))


@pytest.mark.parametrize("case, error, match", [
    ("missing", FileNotFoundError, "video not found"),
    ("empty", VideoError, "empty file"),
    ("corrupt", VideoError, "not a video, or corrupt"),
    ("codec", VideoError, r"video codec \(none \(QQZZ"),
    ("no_frames", VideoError, "contains no video frames"),
])
def test_bad_videos_raise_clear_errors(case, error, match, tiny_seg_models, sam_video, tmp_path: Path) -> None:
    path = tmp_path / f"{case}.avi"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "corrupt":
        path.write_bytes(b"this is not a video" * 100)
    elif case in ("codec", "no_frames"):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
        for index in range(0 if case == "no_frames" else 5):
            writer.write(make_test_frame(index, 48, 64))
        writer.release()
        if case == "codec":  # relabel the stream with a FourCC no decoder knows: a real unsupported codec
            path.write_bytes(path.read_bytes().replace(b"MJPG", b"QQZZ"))
    with pytest.raises(error, match=match):
        segment_video(path, "square", tiny_seg_models, tmp_path / "out", sam_video=sam_video,
                      detector=scripted_detector, progress=False)
    assert not (tmp_path / "out" / "video_overlay.mp4").exists()


@pytest.mark.parametrize("option, value", [("frame_stride", 0), ("max_frames", 0), ("redetect_every", -1),
                                           ("match_iou", 1.5), ("max_objects", 0), ("forget_after_s", -1.0),
                                           ("revive_distance", -1.0), ("merge_iou", 0.0), ("merge_frames", -1)])
def test_bad_options_name_the_fix(option, value) -> None:
    with pytest.raises(ValueError, match=f"^{option}="):
        VideoSettings(**{option: value})


def test_empty_prompt_is_refused(tiny_seg_models, tmp_path: Path) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=2, height=48, width=64)
    with pytest.raises(ValueError, match="PROMPT .* is empty"):
        segment_video(clip, "  ", tiny_seg_models, tmp_path / "out")
