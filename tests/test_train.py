"""Training end to end on the synthetic data set: accuracy, resume, checkpoints, bad input."""
import json
import math
import subprocess
import sys

import pytest
import torch

from nbhelpers.vit.checkpoint import CheckpointError, load_checkpoint
from nbhelpers.vit.config import build_config
from nbhelpers.vit.state import Schedule
from nbhelpers.vit.train import fit


def smoke(tmp_path, **overrides):
    return build_config("smoke", out_dir=str(tmp_path), device="cpu", report_plots=False, **overrides)


def test_schedule_warmup_end_and_final_step():
    total, warmup, peak, floor = 1000, 100, 1e-3, 1e-5
    lr = Schedule(total, warmup, peak, floor).lr
    assert lr(0) == pytest.approx(peak / warmup)
    assert lr(warmup - 1) == pytest.approx(peak)
    assert lr(warmup) == pytest.approx(peak)
    assert lr(total - 1) == pytest.approx(floor)
    middle = lr(warmup + (total - 1 - warmup) // 2)
    assert middle == pytest.approx((peak + floor) / 2, rel=0.01)
    values = [lr(step) for step in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine phase must not increase"


def test_a_resized_schedule_goes_on_from_where_it_is_and_ends_at_the_floor():
    # A time budget that falls behind at step 600 of 1000 moves the end to step 700: no jump in the LR, still decaying,
    # and the floor is reached at the new last step.
    schedule = Schedule(1000, 100, 1e-3, 1e-5)
    before = schedule.lr(600)
    schedule.resize(700, 600)
    assert schedule.lr(600) == pytest.approx(before, rel=1e-12)
    values = [schedule.lr(step) for step in range(600, 700)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(1e-5)
    schedule.resize(650, 620)  # behind again: squeezed once more, from step 620's LR
    assert schedule.lr(620) == pytest.approx(values[20], rel=1e-12) and schedule.lr(649) == pytest.approx(1e-5)
    early = Schedule(1000, 100, 1e-3, 1e-5)
    early.resize(200, 40)  # sized during warm-up: warm-up is never cut below the steps already ramped
    assert early.warmup_steps == 50 and early.lr(49) == pytest.approx(1e-3) and early.lr(199) == pytest.approx(1e-5)


def test_resume_ends_with_the_same_steps_and_weights_as_an_uninterrupted_run(tmp_path):
    whole = fit(smoke(tmp_path / "whole", epochs=3))
    first = fit(smoke(tmp_path / "split", epochs=3, stop_after_epochs=1))
    assert first.status == "stopped" and first.step == 2000 // 64 and first.summary == {}
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == first.step
    second = fit(smoke(tmp_path / "split", epochs=3))
    assert second.status == "finished" and second.step == whole.step == 3 * (2000 // 64)
    assert [r["epoch"] for r in second.history] == [1, 2, 3]
    assert second.summary["final_test_accuracy"] == whole.summary["final_test_accuracy"]
    for a, b in zip(whole.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    again = fit(smoke(tmp_path / "split", epochs=3))  # a finished run re-run: nothing more is trained
    assert again.step == whole.step


def test_corrupt_checkpoint_is_refused_and_kept_until_fresh_is_asked(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt, truncated or malformed.*FRESH=True"):
        fit(smoke(tmp_path, epochs=1))
    assert (tmp_path / "last.pt").read_bytes() == b"PK\x03\x04 truncated"
    result = fit(smoke(tmp_path, epochs=1, fresh=True))
    assert result.status == "finished"
    moved = list(tmp_path.glob("last.pt.old-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == b"PK\x03\x04 truncated"


def test_resume_with_a_different_model_is_refused(tmp_path):
    fit(smoke(tmp_path, epochs=2, stop_after_epochs=1))
    with pytest.raises(CheckpointError, match="different configuration.*dim"):
        fit(smoke(tmp_path, epochs=2, dim=32))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from nbhelpers.vit import model as model_module

    fit(smoke(tmp_path, epochs=3, stop_after_epochs=1))
    good = (tmp_path / "last.pt").read_bytes()
    original_forward = model_module.VisionTransformer.forward
    # Simulate a divergence: the model starts returning NaN logits in training mode.
    monkeypatch.setattr(model_module.VisionTransformer, "forward",
                        lambda self, x: original_forward(self, x) * (float("nan") if self.training else 1.0))
    with pytest.raises(FloatingPointError, match=r"nan.*last finite checkpoint .*last.pt \(step 31\) is kept"):
        fit(smoke(tmp_path, epochs=3))
    assert (tmp_path / "last.pt").read_bytes() == good


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="BATCH_SIZE=5000 is larger than the 2000 training images"):
        fit(smoke(tmp_path, batch_size=5000))


def test_unwritable_out_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="OUT_DIR"):
        fit(smoke(tmp_path / "file" / "run"))


def test_validation_split_selects_best_checkpoint(tmp_path):
    result = fit(smoke(tmp_path, epochs=2, val_size=200))
    assert all("val_accuracy" in r for r in result.history)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["val_accuracy"] == pytest.approx(max(r.get("ema_val_accuracy", r["val_accuracy"]) for r in result.history))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nbhelpers.vit", *args], capture_output=True, text=True, timeout=300)


def test_cli_trains_headless_and_reports_bad_input(tmp_path, capsys):
    # One real process for the exit code of a whole run; the bad inputs go through main() in this process.
    done = run_cli("--preset", "smoke", "--out", str(tmp_path), "--epochs", "1", "--device", "cpu", "--no-plots", "--set", "dim=32")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run_summary.json").read_text())["config"]["model"]["dim"] == 32
    from nbhelpers.vit.__main__ import main

    # the CLI names its own flags, not the notebook's parameters (PRESET=, DEPTH)
    assert main(["--preset", "huge"]) == 2
    errors = capsys.readouterr().err
    assert "Unknown --preset 'huge'" in errors and "Traceback" not in errors
    assert main(["--preset", "smoke", "--set", "depht=3"]) == 2
    assert "did you mean '--set depth'" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train(tmp_path, precision):
    # GPUs pick bf16 (sm_80+) or fp16 + GradScaler (sm_7x); the same code paths run here under CPU autocast.
    result = fit(smoke(tmp_path, epochs=1, precision=precision, synthetic_train_size=640, synthetic_test_size=128))
    assert result.status == "finished"
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # fp32 reaches 0.51 test accuracy and a 1.94 training loss on this data in one epoch (chance: 0.10 and 2.30);
    # a mixed-precision path that skipped its updates (a scaler stuck on inf) would stay at chance.
    assert result.summary["final_test_accuracy"]["raw"] >= 0.4, result.summary["final_test_accuracy"]
    assert result.history[-1]["train_loss"] < 2.1
    assert ("fp16" in result.summary["device"]) == (precision == "fp16")


def test_a_session_killed_mid_epoch_resumes_from_the_wall_clock_checkpoint(tmp_path, monkeypatch):
    from nbhelpers.vit import train as train_module

    # Augmentation on, so the resumed run must also restore the RNG streams to match.
    augmented = dict(epochs=2, trivial_augment=True, mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0.25, log_every=5)
    whole = fit(smoke(tmp_path / "whole", **augmented))
    calls = {"count": 0}
    original_check = train_module.check_finite

    def dies_on_the_tenth_window(*args):
        calls["count"] += 1
        # the session dies mid-epoch 2 (31 steps an epoch; windows after steps 2, 5 (they time the estimate), 10, ... 31)
        if calls["count"] == 10:
            raise KeyboardInterrupt("session died")
        return original_check(*args)

    monkeypatch.setattr(train_module, "check_finite", dies_on_the_tenth_window)
    with pytest.raises(KeyboardInterrupt):
        fit(smoke(tmp_path / "killed", checkpoint_minutes=0, **augmented))  # a checkpoint at every window
    saved_step = load_checkpoint(tmp_path / "killed" / "last.pt")["step"]
    assert 31 < saved_step < 62, f"the last checkpoint should be mid-epoch 2, got step {saved_step}"
    monkeypatch.setattr(train_module, "check_finite", original_check)
    resumed = fit(smoke(tmp_path / "killed", **augmented))
    assert resumed.step == whole.step == 62
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["fast", "best", "seed"])
def test_every_preset_trains_a_few_steps(tmp_path, preset):
    # The presets' real model sizes (seed: 12 blocks of width 768), so batches of 4 keep this to seconds on a CPU.
    config = build_config(preset, dataset="synthetic", synthetic_train_size=8, synthetic_test_size=4, batch_size=4,
                          eval_batch_size=4, epochs=1, warmup_epochs=0.5, out_dir=str(tmp_path), device="cpu", report_plots=False)
    result = fit(config)
    assert result.step == 2 and result.status == "finished"
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    assert result.summary["parameters"] == sum(p.numel() for p in result.model.parameters())


def test_resume_under_another_precision_and_optimizer_flags(tmp_path):
    # Kaggle/Colab hand out different GPUs between sessions: a bf16/fp32 checkpoint (empty GradScaler state) must
    # resume under fp16, and the optimizer's fused flag must follow this machine, not the checkpoint.
    small = dict(synthetic_train_size=320, synthetic_test_size=64)  # 5 steps an epoch: the resume is what is tested
    fit(smoke(tmp_path, epochs=2, stop_after_epochs=1, precision="fp32", **small))
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["scaler"] == {}
    for group in payload["optimizer"]["param_groups"]:
        group["fused"] = True  # as if written on a CUDA machine
    torch.save(payload, tmp_path / "last.pt")
    from nbhelpers.vit import train as train_module

    seen = {}
    original_load = train_module.TrainState.load

    def spy(self, data):
        original_load(self, data)
        seen["fused"] = [group["fused"] for group in self.optimizer.param_groups]

    train_module.TrainState.load = spy
    try:
        result = fit(smoke(tmp_path, epochs=2, precision="fp16", **small))
    finally:
        train_module.TrainState.load = original_load
    assert result.status == "finished" and result.step == 2 * (320 // 64)
    assert seen["fused"] == [None, None] or seen["fused"] == [False, False]


def test_resume_from_a_previous_output_folder(tmp_path):
    fit(smoke(tmp_path / "version1", epochs=2, stop_after_epochs=1))
    with pytest.raises(FileNotFoundError, match="RESUME_FROM"):
        fit(smoke(tmp_path / "version2", epochs=2, resume_from=str(tmp_path / "nothing-here")))
    result = fit(smoke(tmp_path / "version3", epochs=2, resume_from=str(tmp_path / "version1")))
    assert result.step == 2 * (2000 // 64) and [r["epoch"] for r in result.history] == [1, 2]
    assert load_checkpoint(tmp_path / "version1" / "last.pt")["step"] == 2000 // 64, "the source is left as it was"


def test_compiled_training_on_the_cpu_has_no_graph_breaks_and_no_recompile_per_epoch(tmp_path, monkeypatch):
    # torch.compile is off on CPUs by default, yet inductor works here (gcc): forcing compile_supported selects the
    # compiled path GPUs take, so a graph break or a recompile every epoch shows on a machine without a GPU.
    # One precision only: each costs about 45 s of inductor compile on 2 cores with an empty cache (a clean CI).
    # fp16 + GradScaler (a T4's path) runs the most code; autocast sits outside the compiled model, so Dynamo traces
    # the same code in every precision. Measured once: fp32 and bf16 also gave 3 graphs and no break.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from nbhelpers import platform
    from nbhelpers.vit import train as train_module

    monkeypatch.setattr(platform, "compile_supported", lambda device: True)
    torch._dynamo.reset()
    counters.clear()
    graphs_before_epoch = []
    original = train_module.train_one_epoch

    def counting(loop):
        graphs_before_epoch.append(counters["stats"]["unique_graphs"])
        return original(loop)

    monkeypatch.setattr(train_module, "train_one_epoch", counting)
    try:
        result = fit(smoke(tmp_path, epochs=3, precision="fp16", compile=True, eval_every=1, dim=32, depth=1, heads=2,
                           mlp_dim=64, synthetic_train_size=64, synthetic_test_size=64, batch_size=32, eval_batch_size=64,
                           log_every=2))
        assert "torch.compile on" in result.summary["device"] and "fp16" in result.summary["device"]
        assert dict(counters["graph_break"]) == {}
        # epoch 1 compiled the training step and the evaluated networks (raw, EMA); epochs 2 and 3, each evaluated,
        # add nothing: a recompile per epoch would add graphs here
        assert graphs_before_epoch[0] == 0 and graphs_before_epoch[1] >= 2
        assert counters["stats"]["unique_graphs"] == graphs_before_epoch[1] == graphs_before_epoch[2]
        assert result.step == 6 and all(math.isfinite(record["train_loss"]) for record in result.history)
        assert all("test_accuracy" in record for record in result.history)
    finally:
        torch._dynamo.reset()  # later tests start without this test's compiled code
