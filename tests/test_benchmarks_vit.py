"""benchmarks/vit_throughput.py and benchmarks/time_to_accuracy.py: the naive path computes the same function,
the FLOP count behind MFU is exact, targets report their shortfall, and both --smoke runs print valid JSON lines."""
from __future__ import annotations

import json

import pytest
import torch

from nbhelpers.vit.config import ModelConfig
from nbhelpers.vit.model import Attention, VisionTransformer
from nbhelpers.vit.report import flops_per_image

@pytest.fixture(scope="module")
def throughput(benchmark_script):
    return benchmark_script("vit_throughput")


@pytest.fixture(scope="module")
def tta(benchmark_script):
    return benchmark_script("time_to_accuracy")


@pytest.fixture(scope="module")
def common(benchmark_script):
    return benchmark_script("_common")


def run_smoke(script, capsys, *args: str) -> list[dict]:
    """script.main(["--smoke", *args]) in this process (the one_thread fixture restores torch's threads after the
    smoke run sets one); every stdout line must be JSON."""
    assert script.main(["--smoke", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines, "no output"
    return [json.loads(line) for line in lines]


def tiny(**overrides) -> ModelConfig:
    base = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, drop_path=0.0)
    return ModelConfig(**(base | overrides))


# ----------------------------------------------------------------------------- naive path == project path


@pytest.mark.parametrize("overrides", [{}, {"lsa": True}, {"tokenizer": "spt", "lsa": True, "layerscale": 1e-4, "heads": 4}])
def test_explicit_attention_computes_the_same_outputs_and_gradients_as_sdpa(throughput, monkeypatch, overrides):
    torch.manual_seed(0)
    model = VisionTransformer(tiny(**overrides)).train()  # dropout is 0: train mode is deterministic here
    x = torch.randn(4, 3, 32, 32)
    sdpa_out = model(x)
    sdpa_out.square().mean().backward()
    sdpa_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def forbidden(*args, **kwargs):
        raise AssertionError("the explicit path must not call scaled_dot_product_attention")

    with throughput.explicit_attention(model):
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
            explicit_out = model(x)
            explicit_out.square().mean().backward()
    torch.testing.assert_close(explicit_out, sdpa_out, atol=1e-5, rtol=1e-5)
    for explicit_grad, sdpa_grad in zip((p.grad for p in model.parameters()), sdpa_grads):
        torch.testing.assert_close(explicit_grad, sdpa_grad, atol=1e-5, rtol=1e-4)
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, Attention)), "swap not undone"


def test_train_flops_match_the_analytic_count(throughput):
    config = tiny(depth=2, dim=32, mlp_dim=64, heads=2, patch_size=8)
    model = VisionTransformer(config)
    patches, D, M = (32 // 8) ** 2, 32, 64
    N = patches + 1  # class token
    tokenizer = 2 * (3 * 8 * 8) * D * patches
    block = 2 * N * D * 3 * D + 2 * N * D * D + 2 * 2 * N * D * M + 2 * 2 * N * N * D  # qkv, proj, MLP, QK^T and AV
    head = 2 * D * 10
    assert throughput.train_flops_per_image(model) == 3 * (tokenizer + 2 * block + head)
    assert flops_per_image(model, 32) == tokenizer + 2 * block + head  # report counts attention on every device too


# ----------------------------------------------------------------------------- shared helpers


def test_peak_flops_picks_the_most_specific_gpu_entry(common):
    # The H100 PCIe and NVL parts share "H100" with the SXM part but have other peaks; MFU must not use the wrong one.
    sxm, pcie = common.peak_flops("NVIDIA H100 80GB HBM3"), common.peak_flops("NVIDIA H100 PCIe")
    assert sxm and pcie and pcie < sxm
    assert common.peak_flops("NVIDIA H100 NVL") != sxm
    assert common.peak_flops("NVIDIA H200") == sxm  # same compute die as the SXM H100
    assert common.peak_flops("NVIDIA L40S") is None  # "L4" must match as a word only
    assert common.peak_flops("cpu (2 threads)") is None and common.peak_flops("Some Future GPU") is None


def test_target_fields_report_shortfall_only_where_missed(common):
    missed = common.target_fields({"mfu": 0.31, "images_per_second": 18_000.0}, {"mfu": 0.40, "images_per_second": 17_500.0})
    assert missed["target_met"] is False and missed["shortfall"] == {"mfu": pytest.approx(0.09)}
    met = common.target_fields({"overhead": 4.0}, {"overhead": 10.0}, lower_is_better=("overhead",))
    assert met["target_met"] is True and met["shortfall"] == {}
    over = common.target_fields({"overhead": 12.5}, {"overhead": 10.0}, lower_is_better=("overhead",))
    assert over["shortfall"] == {"overhead": 2.5}
    for skipped in (common.target_fields({"mfu": 0.5}, {"mfu": 0.4}, evaluate=False), common.target_fields({"mfu": None}, {"mfu": 0.4})):
        assert skipped["target_met"] is None and skipped["shortfall"] is None and skipped["target"]["mfu"] == 0.4


def test_emit_prints_one_json_line_and_nulls_non_finite(common, capsys):
    common.emit({"a": 1.5, "b": float("nan"), "c": [1, 2]})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"a": 1.5, "b": None, "c": [1, 2]}


# ----------------------------------------------------------------------------- vit_throughput --smoke


def test_speed_fields_keep_seconds_consistent_with_images_per_second(throughput):
    """A sub-millisecond timing (a smoke step) is recorded precisely enough that images / seconds gives back
    images_per_second (rounding seconds to 0.1 ms made them differ by up to 8% here)."""
    for seconds in (0.000649, 0.00578, 0.0123456, 0.321):
        record = throughput.speed_fields(24, seconds, 1000, "cpu")
        assert record["images_per_second"] == pytest.approx(24 / record["seconds"], rel=1e-3)  # the suite checks 1%


def test_vit_throughput_smoke_prints_every_measurement(throughput, capsys, one_thread):
    records = run_smoke(throughput, capsys, "--steps", "2", "--fit-epochs", "2")
    *measurements, summary = records
    paths = ("naive", "project", "full_loop", "fit")
    assert [(r["model"], r["path"]) for r in measurements] == [(m, p) for m in ("seed", "fast", "best") for p in paths]
    by = {(r["model"], r["path"]): r for r in measurements}
    for record in measurements:
        assert record["benchmark"] == "vit_throughput" and record["smoke"] is True and record["device"].startswith("cpu")
        assert record["images_per_second"] > 0 and record["tflops"] > 0 and record["train_flops_per_image"] > 0
        assert record["mfu"] is None and record["peak_flops"] is None  # no peak for a CPU
        assert record["images_per_second"] == pytest.approx(record["images_timed"] / record["seconds"], rel=0.01)
    for model in ("seed", "fast", "best"):
        naive, project, loop = by[model, "naive"], by[model, "project"], by[model, "full_loop"]
        assert naive["attention"].startswith("explicit") and naive["precision"] == "fp32" and naive["compile"] is False
        assert project["attention"] == "scaled_dot_product_attention" and naive["images_timed"] == 2 * naive["batch_size"]
        assert project["project_over_naive"] == pytest.approx(project["images_per_second"] / naive["images_per_second"], rel=0.01)
        assert summary["project_over_naive"][model] == project["project_over_naive"]
        expected_overhead = 100 * (project["images_per_second"] / loop["images_per_second"] - 1)
        assert loop["loop_overhead_percent"] == pytest.approx(expected_overhead, rel=0.01, abs=0.05)
        assert loop["bare_step_images_per_second"] == project["images_per_second"]
        whole = by[model, "fit"]  # fit() end to end: 2 epochs of 3 steps, both evaluated (first and last)
        assert whole["epochs"] == 2 and whole["evaluated_epochs"] == 2 and whole["steps"] == 6
        assert whole["fit_overhead_percent"] == pytest.approx(100 * (project["images_per_second"] / whole["images_per_second"] - 1), rel=0.01, abs=0.05)
        assert summary["fit_overhead_percent"][model] == whole["fit_overhead_percent"]
    assert by["seed", "project"]["target"]["mfu"] == 0.40 and by["seed", "project"]["target_met"] is None  # CPU: not evaluated
    assert by["fast", "full_loop"]["target"]["loop_overhead_percent"] == 10.0 and by["fast", "full_loop"]["target_met"] is None
    assert "EMA" in by["fast", "full_loop"]["includes"] and "EMA" not in by["seed", "full_loop"]["includes"]  # seed: no EMA
    assert "MixUp/CutMix" in by["fast", "full_loop"]["includes"][0] and "MixUp/CutMix" not in by["seed", "full_loop"]["includes"][0]
    assert by["seed", "project"]["preset_model"]["tokenizer"] == "spt" and by["best", "project"]["preset_model"]["lsa"] is True
    assert summary["path"] == "summary" and summary["target_met"] == {"seed/project": None, "fast/full_loop": None}


def test_vit_throughput_rejects_unknown_models(throughput, capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--smoke", "--models", "seed,tiny"])
    assert exit_info.value.code == 2
    assert "choose from seed,fast,best" in capsys.readouterr().err


# ----------------------------------------------------------------------------- time_to_accuracy


def curve_of(accuracies: list[float], seconds: float = 2.0) -> list[dict]:
    return [{"epoch": i + 1, "train_seconds": seconds * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]


def test_time_to_target_first_epoch_final_evaluation_or_never(tta):
    assert tta.time_to_target(curve_of([0.5, 0.91, 0.89, 0.95]), 0.905, 0.95) == {
        "seconds_to_target": 4.0, "reached_at_epoch": 2, "reached_by": "epoch curve"}
    assert tta.time_to_target(curve_of([0.5, 0.9]), 0.905, 0.906) == {
        "seconds_to_target": 4.0, "reached_at_epoch": 2, "reached_by": "final evaluation"}
    assert tta.time_to_target(curve_of([0.5, 0.9]), 0.905, 0.90)["seconds_to_target"] is None
    assert tta.first_epoch_excess([{"epoch_seconds": s} for s in (9.0, 2.0, 3.0, 2.5)]) == 6.5


def test_time_to_accuracy_smoke_curve_and_summary_agree(tta, capsys, one_thread):
    records = run_smoke(tta, capsys, "--target", "0.3")
    kinds = [r["measurement"] for r in records]
    assert kinds == ["data_decode", "warmup", "curve", "curve", "curve", "summary"]
    decode, warmup, *curve, summary = records
    assert decode["source"] == "synthetic" and decode["train_images"] == 1000 and decode["seconds"] >= 0
    assert warmup["epochs"] == 1 and warmup["seconds"] > warmup["epoch_seconds"] > 0 and warmup["compile"] is False
    assert len(curve) == summary["epochs"] == 3 and [p["epoch"] for p in curve] == [1, 2, 3]
    running = 0.0
    for point in curve:
        running += point["epoch_seconds"]
        assert point["train_seconds"] == pytest.approx(running, abs=0.01)
        assert point["accuracy"] == point["ema_test_accuracy"] and "EMA" in point["accuracy_is"]  # smoke keeps an EMA
    first = next(p for p in curve if p["accuracy"] >= 0.3)  # synthetic data: ~50% after one epoch
    assert summary["seconds_to_target"] == first["train_seconds"] and summary["reached_at_epoch"] == first["epoch"]
    assert summary["target_met"] is True and summary["shortfall"] == 0.0
    assert summary["total_train_seconds"] == curve[-1]["train_seconds"]
    # smoke's EMA decay (0.98) ramps up over 440 steps; these 3 short epochs end before, with no validation split: raw
    assert summary["final_test_accuracy_is"] == "raw+flip-tta" and 0 <= summary["final_test_accuracy"] <= 1
    assert summary["warmup_seconds"] == warmup["seconds"] and summary["decode_seconds"] == decode["seconds"]


def test_time_to_accuracy_needs_data_outside_smoke(tta, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tta.main(["--preset", "fast"])
    assert exit_info.value.code == 2 and "--data PATH is required" in capsys.readouterr().err


def test_strict_fp32_turns_tf32_off_inside_and_restores_it(common):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as select_runtime leaves them on CUDA
        with common.strict_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_profile_adds_the_project_steps_top_ops(throughput, capsys, one_thread) -> None:
    records = run_smoke(throughput, capsys, "--models", "fast", "--profile")
    project = next(r for r in records if r.get("path") == "project")
    ops = project["profile"]
    assert ops and any("adam" in op["op"].lower() for op in ops), [op["op"] for op in ops]
    assert "profile" not in next(r for r in records if r.get("path") == "naive")
