"""Train on several GPUs from a notebook: the same configuration under `torchrun` in a subprocess.

A Jupyter kernel cannot use `torch.multiprocessing.spawn` (the children cannot import `__main__`), and fork-based
launchers break once CUDA is initialised in the kernel. A subprocess running `torchrun -m nbhelpers.vit` has
neither problem; its output is streamed into the cell, then the result is loaded back for the report cells.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from nbhelpers.platform import atomic_write, ensure_writable_dir, resolve_paths, select_runtime
from nbhelpers.vit.checkpoint import load_checkpoint
from nbhelpers.vit.config import Config
from nbhelpers.vit.data import load_data
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.state import RESULTS_SAVED, FitResult
from nbhelpers.vit.train import fit


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fit_on_gpus(config: Config, num_gpus: int | None = None, processes: int | None = None) -> FitResult:
    """Train in this process on 0 or 1 GPU, or under torchrun with one process per GPU.

    Args:
        config: from `build_config`; OUT_DIR receives `launch_config.json` for the subprocess.
        num_gpus: GPUs to use; None = all visible.
        processes: force this many torchrun processes (tests: 2 CPU processes on gloo); None = one per GPU.
    Returns:
        FitResult as `fit` returns it (model, data and predictions loaded back from OUT_DIR after a torchrun run).
    """
    count = processes or min(num_gpus if num_gpus is not None else visible_gpus(), visible_gpus())
    if count <= 1:
        return fit(config)
    out_dir = ensure_writable_dir(resolve_paths("q1_vit", config.train.data_root, config.train.out_dir).out_dir, "OUT_DIR")
    config_file = out_dir / "launch_config.json"
    text = json.dumps(config.to_dict(), indent=2)
    atomic_write(config_file, lambda file: file.write(text.encode()))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
               "-m", "nbhelpers.vit", "--config-file", str(config_file), "--out", str(out_dir)]
    started = time.time()
    run_streaming(command)
    return load_result(config, out_dir, since=started)


def fit_in_subprocess(config: Config, gpu: int | None, log_path: Path) -> int:
    """Train `config` to the end in a fresh `python -m nbhelpers.vit` process pinned to one GPU; wait for it.

    For several independent runs at once (one per GPU, e.g. an ablation study): each process sees only its GPU
    through CUDA_VISIBLE_DEVICES, so the runs cannot meet on one device. DDP (`fit_on_gpus`) is for one big run.

    Args:
        config: its OUT_DIR receives `launch_config.json`.
        gpu: the GPU index to pin (None = leave CUDA_VISIBLE_DEVICES as it is).
        log_path: the process's merged stdout and stderr (the run's own progress, for reading afterwards).
    Returns:
        The process's exit code (0 = finished; see `nbhelpers.vit.__main__` for the others).
    """
    out_dir = ensure_writable_dir(resolve_paths("q1_vit", config.train.data_root, config.train.out_dir).out_dir, "OUT_DIR")
    config_file = out_dir / "launch_config.json"
    text = json.dumps(config.to_dict(), indent=2)
    atomic_write(config_file, lambda file: file.write(text.encode()))
    environment = os.environ | {"PYTHONUNBUFFERED": "1"} | ({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})
    command = [sys.executable, "-m", "nbhelpers.vit", "--config-file", str(config_file), "--out", str(out_dir)]
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode


def run_streaming(command: list[str]) -> None:
    """Run `command`, printing its merged output line by line as it comes; raise with the tail when it fails.

    A non-zero exit after rank 0 printed its "results saved:" line is a crash while the processes tore down (seen
    once in CI, 2 gloo processes: "terminate called without an active exception" after a stopped run). Every file
    was written and verified before that line, so the run is kept and the crash is named in one line.
    """
    print("launching:", " ".join(command), flush=True)
    tail: deque[str] = deque(maxlen=30)
    saved = False
    environment = os.environ | {"PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environment) as process:
        for line in process.stdout:
            tail.append(line)
            saved = saved or RESULTS_SAVED in line  # in the merged output it may follow a progress bar's last frame
            print(line, end="", flush=True)
        code = process.wait()
    if code != 0 and saved:
        print(f"[nbhelpers] torchrun exited with code {code} after the results were saved (a crash while the processes "
              "shut down); the run is complete and is loaded as usual.", flush=True)
    elif code != 0:
        raise RuntimeError(f"torchrun exited with code {code}; its last lines:\n{''.join(tail)}"
                           "If NCCL hangs on Kaggle's two T4s, set os.environ['NCCL_P2P_DISABLE'] = '1' before this cell.")


def load_result(config: Config, out_dir: Path, since: float) -> FitResult:
    """The FitResult of a finished torchrun run: summary, reported weights and test predictions from OUT_DIR.

    A run_summary.json older than `since` belongs to an earlier run: then the run stopped early (STOP_AFTER_EPOCHS).
    """
    summary_path = out_dir / "run_summary.json"
    last = load_checkpoint(out_dir / "last.pt")
    if not summary_path.exists() or summary_path.stat().st_mtime < since:
        return FitResult(config, out_dir, "stopped", last["step"], last["history"], {})
    summary = json.loads(summary_path.read_text())
    model = VisionTransformer(config.model).to(select_runtime(config.train.device, verbose=False).device)
    weights = last["ema"] if summary["final_test_accuracy"]["reported_is"].startswith("ema") else last["model"]
    model.load_state_dict(weights)
    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    data = load_data(config.train, paths.data_root, out_dir / "cache")
    predictions = np.load(out_dir / "test_predictions.npy")
    return FitResult(config, out_dir, "finished", last["step"], last["history"], summary, model.eval(), data, predictions)
