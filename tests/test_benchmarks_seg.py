"""benchmarks/seg_speed.py --smoke: every line is JSON with the measurements the GPU run reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_seg_speed_smoke_reports_every_measurement(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/seg_speed.py", "--smoke", "--profile", "--models", str(tmp_path / "models")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(records) == len(done.stdout.strip().splitlines()) - done.stdout.count("[nbhelpers]"), done.stdout
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        by_kind.setdefault(record["measurement"], []).append(record)
    images = by_kind["image_end_to_end"]
    assert [r["batch_size"] for r in images] == [1, 2] and all(r["ms_per_image"] > 0 for r in images)
    assert images[0]["boxes_per_image"] == 5, "max_detections=5 keeps five of the boxes"
    assert images[0]["target"]["ms_per_image"] == 100.0 and images[0]["target_met"] is None  # targets are for an H100
    assert by_kind["clipseg"][0]["ms_per_image"] > 0
    short, long = by_kind["video_end_to_end"]
    assert (short["frames"], long["frames"]) == (12, 120) and long["frames_per_second"] > 0
    assert long["frames_held_peak"] >= 1  # reported (the bound itself: test_seg_video's pruning test)
    assert by_kind["video_memory_growth"][0]["growth"] is None  # no GPU memory to compare on a CPU
    assert by_kind["video_propagation_only"][0]["frames_per_second"] > 0
    for kind in ("image_profile", "video_propagation_profile"):  # torch.profiler's top ops, by self time
        ops = by_kind[kind][0]["top_ops"]
        assert ops and all(op["ms_per_step"] >= 0 and 0 <= op["share"] <= 1 for op in ops)
        assert [op["ms_per_step"] for op in ops] == sorted((op["ms_per_step"] for op in ops), reverse=True)


def test_ui_speed_smoke_reports_a_click(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/ui_speed.py", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (record,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert (record["width"], record["height"]) == (600, 400) and record["saved"]
    assert 0 < record["model_s"] < record["click_s"] <= record["saved_s"]
    assert record["target_s"] == pytest.approx(3 * record["model_s"] + 2, abs=0.01)


def test_seg_speed_sam3_smoke_reports_image_and_video(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/seg_speed.py", "--smoke", "--backend", "sam3", "--repeats", "1",
                           "--video-frames", "2", "--models", str(tmp_path / "models")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {record["backend"] for record in records} == {"sam3"} and records[0]["parameters"] > 0
    images = [record for record in records if record["measurement"] == "image_end_to_end"]
    assert [r["batch_size"] for r in images] == [1, 2] and all(r["ms_per_image"] > 0 for r in images)
    (video,) = [record for record in records if record["measurement"] == "video_end_to_end"]
    assert video["frames"] == 2 and video["frames_per_second"] > 0 and video["objects"] == 1
    assert video["peak_host_rss_bytes"] > 0 and video["peak_gpu_memory_bytes"] is None
