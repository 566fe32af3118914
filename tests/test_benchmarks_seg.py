"""benchmarks/seg_speed.py and ui_speed.py --smoke: every line is JSON with the measurements the GPU run reports.
The scripts' main() runs in this process (see the benchmark_script fixture), on the session's tiny models."""
from __future__ import annotations

import json
import re

import pytest
import torch


def json_lines(out: str) -> list[dict]:
    """Every stdout line is a JSON record, except the [nbhelpers] notes that loading models prints (and, in this
    process, the terminal codes a finished progress bar leaves)."""
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\r", "", line) for line in out.strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith("[nbhelpers]")]
    assert lines and all(line.startswith("{") for line in lines), out
    return [json.loads(line) for line in lines]


def test_seg_speed_smoke_reports_every_measurement(benchmark_script, tiny_seg_model_dirs, capsys, one_thread) -> None:
    models = tiny_seg_model_dirs["dino"].parent  # the script reuses the session's tiny models
    assert benchmark_script("seg_speed").main(["--smoke", "--profile", "--models", str(models)]) == 0
    records = json_lines(capsys.readouterr().out)
    by_kind: dict[str, list[dict]] = {}
    for record in records:
        by_kind.setdefault(record["measurement"], []).append(record)
    images = by_kind["image_end_to_end"]
    assert [r["batch_size"] for r in images] == [1, 2] and all(r["ms_per_image"] > 0 for r in images)
    assert images[0]["boxes_per_image"] == 5, "max_detections=5 keeps five of the boxes"
    assert images[0]["target_met"] is None  # targets are judged only on an H100
    assert by_kind["clipseg"][0]["ms_per_image"] > 0
    short, long = by_kind["video_end_to_end"]
    assert (short["frames"], long["frames"]) == (6, 24) and long["frames_per_second"] > 0
    assert long["frames_held_peak"] >= 1  # reported (the bound itself: test_seg_video's pruning test)
    assert by_kind["video_memory_growth"][0]["growth"] is None  # no GPU memory to compare on a CPU
    assert by_kind["video_propagation_only"][0]["frames_per_second"] > 0
    for kind in ("image_profile", "video_propagation_profile"):  # torch.profiler's top ops, by self time
        ops = by_kind[kind][0]["top_ops"]
        assert ops and all(op["ms_per_step"] >= 0 and 0 <= op["share"] <= 1 for op in ops)
        assert [op["ms_per_step"] for op in ops] == sorted((op["ms_per_step"] for op in ops), reverse=True)


def test_ui_speed_smoke_reports_a_click(benchmark_script, capsys, one_thread) -> None:
    benchmark_script("ui_speed").main(["--smoke"])
    (record,) = json_lines(capsys.readouterr().out)
    assert (record["width"], record["height"]) == (600, 400) and record["saved"]
    assert 0 < record["model_s"] < record["click_s"] <= record["saved_s"]


def test_seg_speed_sam3_smoke_reports_image_and_video(benchmark_script, tiny_sam3_model_dirs, capsys, one_thread,
                                                      monkeypatch) -> None:
    from nbhelpers.testing import set_sam3_kernel_state

    set_sam3_kernel_state(monkeypatch, "failed", error="offline")  # as on a machine without internet access
    models = tiny_sam3_model_dirs["sam3"].parent
    assert benchmark_script("seg_speed").main(["--smoke", "--backend", "sam3", "--repeats", "1", "--video-frames", "2",
                                               "--models", str(models)]) == 0
    records = json_lines(capsys.readouterr().out)
    assert {record["backend"] for record in records} == {"sam3"} and records[0]["parameters"] > 0
    images = [record for record in records if record["measurement"] == "image_end_to_end"]
    assert [r["batch_size"] for r in images] == [1, 2] and all(r["ms_per_image"] > 0 for r in images)
    (video,) = [record for record in records if record["measurement"] == "video_end_to_end"]
    assert video["frames"] == 2 and video["frames_per_second"] > 0 and video["objects"] == 1
    assert video["detection_nms"] == "5 best kept (cv-utils kernel not loaded)"
    assert video["sam3_postprocessing"] == "skipped: cv-utils kernel could not be loaded (offline)"
    assert video["peak_host_rss_bytes"] > 0 and video["peak_gpu_memory_bytes"] is None


@pytest.mark.parametrize("state", ["missing", "failed", "loaded"])
def test_seg_speed_replaces_sam3_nms_only_when_the_kernel_did_not_load(benchmark_script, state, monkeypatch) -> None:
    from transformers.models.sam3_video import modeling_sam3_video

    from nbhelpers.testing import set_sam3_kernel_state

    set_sam3_kernel_state(monkeypatch, state)
    transformers_nms = modeling_sam3_video.nms_masks
    with benchmark_script("seg_speed").keep_best_detections(2):
        replaced = modeling_sam3_video.nms_masks is not transformers_nms
        if replaced:
            probs = torch.tensor([0.1, 0.9, 0.5, 0.7])
            keep = modeling_sam3_video.nms_masks(probs, torch.zeros(4, 8, 8), 0.3, 0.5)
            assert keep.tolist() == [False, True, False, True]  # the 2 best above the threshold
    assert replaced == (state != "loaded") and modeling_sam3_video.nms_masks is transformers_nms
