"""Streaming video I/O: probe, frame iteration, the MP4 writer, and the two helper threads."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

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
