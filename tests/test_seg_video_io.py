"""Streaming video I/O: probe, frame iteration, the MP4 writer, and the two helper threads."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from nbhelpers.seg.video import io as video_io
from nbhelpers.seg.video.io import VideoWriter, iter_frames, probe_video
from nbhelpers.seg.video.overlap import OrderedWorker, prefetch
from nbhelpers.testing import make_test_frame, make_test_video


def test_probe_and_iterate_with_stride_and_cap(tmp_path: Path) -> None:
    info = probe_video(make_test_video(tmp_path / "clip.mp4", frames=10, height=48, width=64, fps=10.0))
    assert (info.width, info.height, info.fps, info.frame_count, info.reader) == (64, 48, 10.0, 10, "opencv")
    frames = list(iter_frames(info, stride=3, max_frames=3))
    assert [index for index, _ in frames] == [0, 3, 6]
    # the square's colour survives mp4v encoding closely enough to find it at the expected place
    assert frames[1][1][12:20, 8:14, 0].mean() > 180


def test_writer_keeps_odd_sizes_by_padding_and_replaces_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    frame = make_test_frame(0, 49, 65)
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(target, 65, 49, 10.0) as writer:
            writer.write(frame)
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and not list(tmp_path.glob(".out.partial*"))
    with VideoWriter(target, 65, 49, 10.0) as writer:
        for _ in range(3):
            writer.write(frame)
    capture = cv2.VideoCapture(str(target))
    ok, decoded = capture.read()
    assert ok and writer.codec == "h264" and decoded.shape == (50, 66, 3)  # one padded row and column
    assert np.abs(decoded[:49, :65, ::-1].astype(int) - frame).mean() < 6  # the picture is not rescaled


class _UnopenableCapture:
    """cv2.VideoCapture for a build that cannot decode the file: nothing opens, nothing reads."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def isOpened(self) -> bool:
        return False

    def read(self):
        return False, None

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


def test_ffmpeg_probe_and_read_when_opencv_cannot_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = make_test_video(tmp_path / "clip.mp4", frames=10, height=48, width=64, fps=10.0)
    info = probe_video(clip)
    reference = dict(iter_frames(info))  # OpenCV's decoding of the same file
    monkeypatch.setattr(video_io.cv2, "VideoCapture", _UnopenableCapture)
    info = probe_video(clip)
    assert (info.reader, info.width, info.height, info.fps, info.frame_count) == ("ffmpeg", 64, 48, 10.0, 10)
    frames = list(iter_frames(info, stride=3, max_frames=3))
    assert [index for index, _ in frames] == [0, 3, 6]
    for index, frame in frames:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        # same pixels as OpenCV's decode, up to the two decoders' colour conversion
        assert np.abs(frame.astype(np.int16) - reference[index]).mean() < 3


def test_writer_falls_back_to_mp4v_without_the_h264_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` now raises ImportError
    target = tmp_path / "out.mp4"
    with pytest.warns(UserWarning, match="writing mp4v"):
        writer = VideoWriter(target, 64, 48, 8.0)
    with writer:
        for index in range(4):
            writer.write(make_test_frame(index, 48, 64))
    assert writer.codec == "mp4v" and writer.frames_written == 4
    capture = cv2.VideoCapture(str(target))
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("ascii", "replace")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    assert fourcc.lower() in ("mp4v", "fmp4") and count == 4  # MPEG-4 part 2 (FFmpeg reads the tag as FMP4), not H.264 and not list(tmp_path.glob(".out.partial*"))


def test_prefetch_keeps_order_raises_errors_and_closes_the_source() -> None:
    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("decode failed")

    with pytest.raises(ValueError, match="decode failed"):
        list(prefetch(failing()))
    closed = threading.Event()

    def endless():
        try:
            count = 0
            while True:
                count += 1
                yield count
        finally:
            closed.set()

    for item in prefetch(endless(), depth=3):
        if item == 5:
            break
    assert closed.is_set(), "breaking out of the loop stops the thread and closes the source"


def test_ordered_worker_runs_in_order_bounds_pending_and_surfaces_errors() -> None:
    done, running = [], []

    def job(value: int) -> None:
        running.append(value)
        time.sleep(0.005)
        done.append(value)

    worker = OrderedWorker(pending=2)
    for value in range(10):
        worker.submit(job, value)
        assert len(worker.futures) <= 2
    worker.finish()
    assert done == list(range(10))

    def broken() -> None:
        raise OSError("disk full")

    worker = OrderedWorker(pending=1)
    worker.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        worker.submit(job, 1)
    worker.cancel()
