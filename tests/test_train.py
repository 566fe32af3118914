"""Training end to end on the synthetic data set: accuracy, resume, checkpoints, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from nbhelpers.vit.checkpoint import CheckpointError, load_checkpoint
from nbhelpers.vit.config import build_config
from nbhelpers.vit.train import fit, lr_at


def smoke(tmp_path, **overrides):
    return build_config("smoke", out_dir=str(tmp_path), device="cpu", report_plots=False, **overrides)


def test_schedule_warmup_end_and_final_step():
    total, warmup, peak, floor = 1000, 100, 1e-3, 1e-5
    assert lr_at(0, total, warmup, peak, floor) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, total, warmup, peak, floor) == pytest.approx(peak)
    assert lr_at(warmup, total, warmup, peak, floor) == pytest.approx(peak)
    assert lr_at(total - 1, total, warmup, peak, floor) == pytest.approx(floor)
    middle = lr_at(warmup + (total - 1 - warmup) // 2, total, warmup, peak, floor)
    assert middle == pytest.approx((peak + floor) / 2, rel=0.01)
    values = [lr_at(step, total, warmup, peak, floor) for step in range(warmup, total)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine phase must not increase"


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

    def dies_on_the_ninth_window(*args):
        calls["count"] += 1
        if calls["count"] == 9:  # the session dies mid-epoch 2 (31 steps an epoch, windows of 5 steps)
            raise KeyboardInterrupt("session died")
        return original_check(*args)

    monkeypatch.setattr(train_module, "check_finite", dies_on_the_ninth_window)
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
