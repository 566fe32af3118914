"""Host memory (RSS) of `segment_video` on a short clip and a 10x longer one, tiny models, CPU: one JSON line each.

    python benchmarks/video_memory.py                    # 100 and 1000 frames, SAM 2 state pruned (the default)
    python benchmarks/video_memory.py --no-prune         # the same with transformers' keep-everything session

Peak RSS is sampled every 50 ms while each clip runs. GPU memory at 720p is measured by seg_speed.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from nbhelpers.seg.video import tracking
from nbhelpers.seg.models import load_models, load_sam2_video
from nbhelpers.seg.types import FrameDetections, VideoSettings
from nbhelpers.seg.video import segment_video
from nbhelpers.testing import build_tiny_segmentation_models, make_test_video


def rss_megabytes() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))


def peak_rss_during(function):
    """(function(), highest RSS in MB seen while it ran)."""
    samples, stop = [rss_megabytes()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_megabytes())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = function()
    finally:
        stop.set()
        sampler.join()
    return result, max(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--no-prune", action="store_true", help="keep every frame's state, as transformers does")
    args = parser.parse_args()
    if args.no_prune:  # measure what pruning saves: the session keeps everything
        tracking.StreamingTracker.prune = lambda self, frame_index: setattr(
            self, "frames_held_peak", max(self.frames_held_peak, self.frames_held()))
    with tempfile.TemporaryDirectory(prefix="video_memory_") as temp:
        dirs = build_tiny_segmentation_models(Path(temp) / "models")
        models = load_models(dirs["dino"], dirs["sam"], dirs["clipseg"], device="cpu")
        sam_video = load_sam2_video(dirs["sam"])
        box = np.asarray([[10, 8, 30, 24]], np.float32)  # the moving square's start: one tracked object
        detector = lambda frame: FrameDetections(box, np.ones(1, np.float32), ["square"], "fixed-box")  # noqa: E731
        for frames in args.frames:
            clip = make_test_video(Path(temp) / f"clip{frames}.mp4", frames=frames, height=48, width=64)
            gc.collect()
            result, peak = peak_rss_during(lambda: segment_video(clip, "square", models, Path(temp) / f"out{frames}",
                                                                 sam_video=sam_video, detector=detector, progress=False,
                                                                 video_settings=VideoSettings(redetect_every=0)))
            print(json.dumps({"benchmark": "video_memory", "pruned": not args.no_prune, "frames": frames,
                              "peak_rss_mb": round(peak, 1), "frames_held_peak": result.frames_held_peak,
                              "frames_per_second": round(result.frames_per_second, 1)}), flush=True)


if __name__ == "__main__":
    main()
