"""DDP on the CPU: 2 gloo processes under torchrun against 1 process, resume across process counts, rank-0-only writes.

Each torchrun launch costs a few seconds of process start-up, so the file launches it twice, through the
notebook's own launcher (`nbhelpers.vit.launch.fit_on_gpus` with processes=2), on a tiny model.
"""
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from nbhelpers.vit.checkpoint import load_checkpoint
from nbhelpers.vit.config import build_config
from nbhelpers.vit.launch import fit_on_gpus
from nbhelpers.vit.train import fit

TINY = dict(dim=32, depth=1, heads=2, mlp_dim=64, synthetic_train_size=512, synthetic_test_size=128, batch_size=64,
            device="cpu", precision="fp32", report_plots=False, log_every=4)
# Every pixel-level random op off: the two runs then see the same inputs, only the reduction order differs.
NO_RANDOM_AUGMENTATION = dict(crop_padding=0, flip=False)

# An audit hook in every torchrun process (via sitecustomize) that logs the files a rank other than 0 opens for
# writing, creates, renames or deletes under OUT_DIR: the "only rank 0 writes" check sees real file operations.
WRITE_SPY = textwrap.dedent("""
    import os, sys
    _out, _log = os.environ.get("SPY_OUT_DIR"), os.environ.get("SPY_LOG")
    def _spy(event, args):
        if os.environ.get("RANK", "0") == "0" or not _out or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        writing = event != "open" or (args[1] and any(c in str(args[1]) for c in "wax+")) or (
            isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and os.path.abspath(path).startswith(_out):
            with open(_log, "a") as log:
                log.write(f"rank {os.environ['RANK']} {event} {path}\\n")
    if _out:
        sys.addaudithook(_spy)
    if os.environ.get("ABORT_RANK_0_AT_EXIT") and os.environ.get("RANK") == "0":
        import atexit
        atexit.register(os._exit, 134)  # a crash after the run, while the interpreter exits (134: as gloo's SIGABRT, no core file)
""")


@pytest.fixture
def write_spy(tmp_path, monkeypatch):
    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(WRITE_SPY)
    log = tmp_path / "rank_writes.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(spy_dir), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SPY_LOG", str(log))
    return log


def test_two_processes_match_one_process_in_fp32_without_augmentation_randomness(tmp_path, write_spy, monkeypatch):
    settings = dict(TINY, epochs=2, **NO_RANDOM_AUGMENTATION)
    single = fit(build_config("smoke", out_dir=str(tmp_path / "one"), **settings))
    monkeypatch.setenv("SPY_OUT_DIR", str(tmp_path / "two"))
    double = fit_on_gpus(build_config("smoke", out_dir=str(tmp_path / "two"), **settings), processes=2)
    assert double.status == "finished" and double.step == single.step == 2 * (512 // 64)
    assert double.summary["world_size"] == 2 and len(double.summary["devices"]) == 2
    # Same global batch of 64 (32 per process): the loss curve and the weights agree to float32 reduction-order noise.
    np.testing.assert_allclose([r["train_loss"] for r in double.history], [r["train_loss"] for r in single.history], rtol=1e-5)
    assert [r["test_accuracy"] for r in double.history] == [r["test_accuracy"] for r in single.history]
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    for weights in ("model", "ema"):
        for name in one[weights]:
            expected, actual = one[weights][name], two[weights][name]
            if name.endswith("attn.qkv.bias"):
                # The key bias has an exactly-zero gradient (softmax ignores a constant shift of the logits), so
                # AdamW turns rounding noise (~1e-9) into steps of up to lr: that third is compared loosely.
                torch.testing.assert_close(actual.view(3, -1)[1], expected.view(3, -1)[1], rtol=0, atol=1e-4, msg=name)
                expected, actual = expected.view(3, -1)[[0, 2]], actual.view(3, -1)[[0, 2]]
            # Measured: at most 1.2e-7 relative to each tensor's largest value (4e-6 for a LayerNorm bias).
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"{weights} {name}")
    assert not write_spy.exists(), write_spy.read_text()  # rank 1 wrote nothing under OUT_DIR


def test_two_processes_with_augmentation_learn_and_resume_with_one(tmp_path, write_spy, monkeypatch, capsys):
    settings = dict(TINY, epochs=4, lr=3e-3, warmup_epochs=0.5)  # smoke's crop + flip on: each rank draws its own
    monkeypatch.setenv("SPY_OUT_DIR", str(tmp_path))
    monkeypatch.setenv("ABORT_RANK_0_AT_EXIT", "1")  # torchrun then exits 1, after rank 0's "results saved:" line
    stopped = fit_on_gpus(build_config("smoke", out_dir=str(tmp_path), stop_after_epochs=2, **settings), processes=2)
    assert "torchrun exited with code 1 after the results were saved" in capsys.readouterr().out
    assert stopped.status == "stopped" and stopped.step == load_checkpoint(tmp_path / "last.pt")["step"] == 2 * 8
    assert not write_spy.exists(), write_spy.read_text()
    resumed = fit(build_config("smoke", out_dir=str(tmp_path), **settings))  # the other process count: 1
    assert resumed.step == 4 * 8 and [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.summary["world_size"] == 1
    # Chance is 0.10 on the 10 synthetic classes; the tiny model reaches about 0.5 (1 process, same settings).
    assert resumed.summary["final_test_accuracy"]["raw"] >= 0.3, resumed.summary["final_test_accuracy"]
    assert resumed.history[-1]["train_loss"] < resumed.history[0]["train_loss"]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["steps"] == 32


@pytest.mark.parametrize("saved_first", [True, False])
def test_a_crash_counts_as_a_failure_only_before_the_results_saved_line(saved_first, capsys):
    from nbhelpers.vit.launch import run_streaming
    from nbhelpers.vit.state import RESULTS_SAVED

    bar = "train: 100%|##########| 32/32\r"  # stderr's last bar frame, merged into the same line as the next print
    line = bar + (f"{RESULTS_SAVED} stopped at step 16, /tmp/out/last.pt" if saved_first else "epoch 2/4 | loss 1.708")
    crash = [sys.executable, "-c", f"import os; print({line!r}, flush=True); os._exit(134)"]  # 134: as a SIGABRT
    if saved_first:
        run_streaming(crash)
        assert "after the results were saved" in capsys.readouterr().out
    else:
        with pytest.raises(RuntimeError, match="torchrun exited with code 134"):
            run_streaming(crash)
