"""Training faults (issue 11): divergence, shared OUT_DIR, full disk, stale temp files, stop signals, malformed
checkpoints, bad parameters at the CLI (the time estimate: test_pacing.py). Tiny runs: 128 synthetic images, 2-4 steps an epoch."""
import errno
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nbhelpers import platform
from nbhelpers.vit import train as train_module
from nbhelpers.vit.__main__ import main
from nbhelpers.vit.checkpoint import CheckpointError, load_checkpoint, save_last
from nbhelpers.vit.config import build_config
from nbhelpers.vit.state import Schedule
from nbhelpers.vit.train import build_state, fit

REPO = Path(__file__).resolve().parents[1]


def tiny(out_dir, **overrides):
    """Smoke preset on 128 synthetic images in batches of 32: 4 steps an epoch, a logging window every 2 steps."""
    settings = dict(out_dir=str(out_dir), device="cpu", report_plots=False, synthetic_train_size=128,
                    synthetic_test_size=64, batch_size=32, log_every=2, epochs=2)
    return build_config("smoke", **(settings | overrides))


def tensors_of(payload):
    return [t for key in ("model", "ema") for t in (payload[key] or {}).values() if t.is_floating_point()]


# ----------------------------------------------------------------------------- 7: NaN


def test_the_issue_repro_never_saves_non_finite_weights_and_says_what_it_kept(tmp_path):
    # python -m nbhelpers.vit --preset smoke --no-plots --epochs 3 --lr 1e6 --set synthetic_train_size=128
    config = build_config("smoke", out_dir=str(tmp_path), device="cpu", report_plots=False, epochs=3, lr=1e6,
                          synthetic_train_size=128)
    with pytest.raises(FloatingPointError) as raised:
        fit(config)
    message = str(raised.value)
    last = tmp_path / "last.pt"
    if last.exists():  # whatever was saved is finite, and the message names that very checkpoint
        payload = load_checkpoint(last)
        assert all(torch.isfinite(t).all() for t in tensors_of(payload))
        assert f"(step {payload['step']}) is kept" in message
    else:
        assert "No checkpoint was written yet" in message and "starts from step 0" in message
    assert "Lower LR" in message


def test_a_divergence_keeps_the_last_finite_checkpoint_and_a_lower_lr_may_resume_it(tmp_path, capsys):
    fit(tiny(tmp_path, epochs=3, stop_after_epochs=1))
    good = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"last finite checkpoint .*last.pt \(step 4\) is kept"):
        fit(tiny(tmp_path, epochs=3, lr=1e6))
    assert (tmp_path / "last.pt").read_bytes() == good
    capsys.readouterr()
    resumed = fit(tiny(tmp_path, epochs=3, lr=1e-3, grad_clip=0.5))  # the settings the message names may change
    printed = capsys.readouterr().out
    assert "changed optimisation settings" in printed and "lr: checkpoint 0.002 vs now 0.001" in printed
    assert resumed.status == "finished" and resumed.step == 12
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    # the schedule continues at the new peak: after epoch 2 (8 of 12 steps, warm-up over after 4) the next lr is step 8's
    assert resumed.history[1]["lr"] == pytest.approx(Schedule(12, 4, 1e-3, 1e-5).lr(8))


def test_no_save_writes_non_finite_weights(tmp_path):
    config = tiny(tmp_path)
    state = build_state(config, platform.select_runtime("cpu"), steps_per_epoch=4)
    with torch.no_grad():
        next(state.model.parameters())[0] = float("nan")
    with pytest.raises(FloatingPointError, match="No checkpoint was written yet"):
        save_last(state, config, tmp_path)
    assert not (tmp_path / "last.pt").exists()


# ----------------------------------------------------------------------------- 8: one run per OUT_DIR


def test_a_second_run_into_a_locked_out_dir_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nbhelpers.platform import RunLock; "
         "RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(300)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(platform.RunLockedError, match=rf"host {socket.gethostname()}, PID {holder.pid}"):
            fit(tiny(tmp_path))
        assert main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, as after a crashed session
        holder.wait()
    assert (tmp_path / ".run.lock").exists()
    result = fit(tiny(tmp_path, epochs=1))
    assert result.status == "finished" and "Took over the lock" in capsys.readouterr().out
    assert not (tmp_path / ".run.lock").exists(), "the lock is released when the run ends"


# ----------------------------------------------------------------------------- 10: full disk


def test_too_little_free_space_is_found_before_training(tmp_path, monkeypatch, capsys):
    # A full disk cannot be made here: the free-space query reports 1 MB instead.
    monkeypatch.setattr(platform.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    with pytest.raises(platform.DiskFullError, match=r"1 MB free but writing 1 checkpoint\(s\) of this model needs about \d+ MB"):
        fit(tiny(tmp_path))
    assert "epoch 1/" not in capsys.readouterr().out, "nothing was trained"


def test_a_full_disk_mid_run_is_one_line_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, capsys):
    fit(tiny(tmp_path, epochs=2, stop_after_epochs=1))
    good = (tmp_path / "last.pt").read_bytes()
    from nbhelpers.vit import checkpoint

    def disk_full(payload, file):  # the write fails part-way, as on a full disk
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    code = main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu", "--no-plots", "--epochs", "2",
                 "--batch-size", "32", "--set", "synthetic_train_size=128", "--set", "synthetic_test_size=64", "--set", "log_every=2"])
    printed = capsys.readouterr().err
    errors = [line for line in printed.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: No space left in"), printed
    assert "the previous last.pt is intact" in errors[0] and "MB" in errors[0] and "Traceback" not in printed
    assert (tmp_path / "last.pt").read_bytes() == good and not list(tmp_path.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 11: temp files, FRESH


def test_stale_temp_files_are_cleaned_and_fresh_moves_the_old_results_aside(tmp_path):
    fit(tiny(tmp_path, epochs=1, report_plots=True))
    fit(tiny(tmp_path, epochs=1, report_plots=True))  # a finished run re-run: best.pt is already linked to last.pt
    report_files = {path.name for path in tmp_path.iterdir() if path.suffix in (".png", ".json")}  # what report.py wrote
    assert not list(tmp_path.glob(".*.tmp")), "re-running a finished run leaves no temp file"
    stale = [tmp_path / ".last.pt.k2j3h4.tmp", tmp_path / ".best.pt.link.tmp", tmp_path / "cache" / ".cifar10_uint8.npz.x1.tmp"]
    for path in stale:  # what kill -9 during a write leaves
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    (tmp_path / "run_summary.json").write_text("{}")
    result = fit(tiny(tmp_path, epochs=1, fresh=True))
    assert not any(path.exists() for path in stale)
    assert result.status == "finished" and (tmp_path / "run_summary.json").read_text() != "{}"
    # every file the old run's report wrote was moved aside (the new run draws no plots), none left beside it
    assert "curves.png" in report_files and "run_summary.json" in report_files
    for name in report_files - {"run_summary.json"}:
        assert len(list(tmp_path.glob(f"{name}.old-*"))) == 1 and not (tmp_path / name).exists(), name
    assert len(list(tmp_path.glob("run_summary.json.old-*"))) == 1


# ----------------------------------------------------------------------------- 12: SIGINT / SIGTERM


def test_sigterm_saves_last_pt_and_the_cli_exits_143(tmp_path, capsys):
    command = [sys.executable, "-m", "nbhelpers.vit", "--preset", "smoke", "--out", str(tmp_path), "--device", "cpu",
               "--no-plots", "--epochs", "3", "--batch-size", "32", "--set", "synthetic_train_size=128",
               "--set", "synthetic_test_size=64", "--set", "log_every=2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    for line in run.stdout:  # training starts right after this line
        if line.startswith("data:"):
            run.send_signal(signal.SIGTERM)
            break
    out, err = run.communicate(timeout=300)
    assert run.returncode == 143, err
    step = load_checkpoint(tmp_path / "last.pt")["step"]
    assert 1 <= step < 12 and f"stopped at step {step}; run again to resume" in out
    assert "Traceback" not in err
    resumed = fit(tiny(tmp_path, epochs=3, stop_after_epochs=1))
    epoch, into = divmod(step, 4)
    position = f"epoch {epoch + 1}, {into} steps in" if into else f"end of epoch {epoch}"
    assert f"at step {step} ({position})" in capsys.readouterr().out  # not "(epoch 0)" inside the first epoch
    assert resumed.step > step and resumed.step % 4 == 0 and len(resumed.history) == resumed.step // 4


def test_ctrl_c_in_a_notebook_saves_and_stops(tmp_path, monkeypatch):
    original_check = train_module.check_finite

    def interrupt_once(*args):  # the user presses Ctrl-C (Jupyter: interrupt the kernel) mid-epoch
        os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(train_module, "check_finite", original_check)
        return original_check(*args)

    monkeypatch.setattr(train_module, "check_finite", interrupt_once)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3; run again to resume"):
        fit(tiny(tmp_path, epochs=2))
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3  # the next step boundary after the window at step 2
    assert signal.getsignal(signal.SIGINT) is handler, "the handler is restored"


# ----------------------------------------------------------------------------- 14: malformed checkpoints


def test_checkpoints_that_unpickle_but_are_malformed_are_refused_like_corrupt_ones(tmp_path):
    fit(tiny(tmp_path, epochs=2, stop_after_epochs=1))
    good = torch.load(tmp_path / "last.pt", weights_only=False)
    no_rng = {key: value for key, value in good.items() if key != "rng"}
    reshaped = good | {"model": good["model"] | {"pos_embed": torch.zeros(1, 3, 64)}}  # as after a code change
    diverged = good | {"model": {name: torch.full_like(t, float("nan")) if t.is_floating_point() else t
                                 for name, t in good["model"].items()}}  # what older versions saved on a divergence
    for bad in (5, no_rng, reshaped, diverged):
        torch.save(bad, tmp_path / "last.pt")
        written = (tmp_path / "last.pt").read_bytes()
        with pytest.raises(CheckpointError, match="corrupt, truncated or malformed.*left untouched.*FRESH=True"):
            fit(tiny(tmp_path, epochs=2))
        assert (tmp_path / "last.pt").read_bytes() == written


# ----------------------------------------------------------------------------- 13 + 6: CLI messages and exit codes


def test_cli_speaks_in_flags_and_refuses_a_missing_gpu_with_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "--fresh" in error and "FRESH=True" not in error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # stands in for a machine without a GPU
    assert main(["--preset", "smoke", "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert main(["--preset", "smoke", "--set", "epochs=ten"]) == 2
    assert "--epochs 'ten' must be a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("name, value, expected", [
    ("label_smoothing", 1.0, "LABEL_SMOOTHING=1.0 must be below 1"), ("num_classes", 1, "NUM_CLASSES=1 must be at least 2"),
])
def test_a_value_out_of_range_is_refused_when_the_config_is_built(name, value, expected):
    # These passed build_config and were refused only by GpuAugment's own checks, after fit() had loaded the data.
    with pytest.raises(ValueError, match=re.escape(expected) + r" \(the preset's value is"):
        build_config("smoke", **{name: value})


def test_everything_the_cli_prints_names_its_flags_and_advice_names_only_what_would_change(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    args = ["--preset", "smoke", "--device", "cpu", "--no-plots", "--epochs", "1", "--batch-size", "32",
            "--set", "synthetic_train_size=128", "--set", "synthetic_test_size=64", "--set", "log_every=2"]
    assert main(args + ["--out", str(tmp_path), "--fresh"]) == 0
    printed = capsys.readouterr().out
    assert "--fresh: moved last.pt aside to last.pt.old-" in printed and "FRESH" not in printed
    # A divergence in fp32 (the CPU's default) with clipping on: only a lower --lr would change anything.
    assert main(args + ["--out", str(tmp_path / "fp32"), "--lr", "1e6"]) == 1
    error = capsys.readouterr().err
    assert "Lower --lr (now 1e+06), then run again" in error and "--precision" not in error and "grad_clip" not in error
    assert main(args + ["--out", str(tmp_path / "bf16"), "--lr", "1e6", "--precision", "bf16", "--set", "grad_clip=0"]) == 1
    assert "Lower --lr (now 1e+06), pass --set grad_clip=1.0 or pass --precision 'fp32', then" in capsys.readouterr().err
