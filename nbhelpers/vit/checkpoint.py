"""Atomic, resumable checkpoints: last.pt (everything needed to continue) and best.pt (weights).

A checkpoint is written to a temp file in the same folder and moved into place with os.replace, so a
session that dies mid-write leaves the previous good file intact.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Fields that may differ between the run that wrote a checkpoint and the run resuming it: they change
# where and how fast we run, not what is trained.
RUNTIME_FIELDS = {
    "data_root", "out_dir", "device", "precision", "compile", "resume", "fresh", "stop_after_epochs",
    "log_every", "checkpoint_minutes", "report_plots", "eval_batch_size",
}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says how to proceed."""


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then os.replace (never a partial file at `path`)."""
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (augmentation runs on the device's generator)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; raise CheckpointError (file untouched) when it is corrupt or truncated."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated zip archives
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}). It was left untouched. "
            "Set FRESH=True to move it aside and start over, or choose another OUT_DIR."
        ) from error
    missing = {"model", "optimizer", "scheduler", "step", "config"} - set(payload)
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}: not a checkpoint of this trainer. Set FRESH=True or choose another OUT_DIR.")
    return payload


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the checkpoint was trained with a different model or recipe."""
    differences = []
    for section in ("model", "augment", "train"):
        for key, value in current[section].items():
            if section == "train" and key in RUNTIME_FIELDS:
                continue
            old = saved.get(section, {}).get(key)
            if isinstance(value, tuple):
                old = tuple(old) if old is not None else old
            if old != value:
                differences.append(f"{key}: checkpoint {old!r} vs now {value!r}")
    if differences:
        raise CheckpointError(
            f"{path} was written by a different configuration ({'; '.join(differences[:5])}). "
            "Use the same parameters to resume, set FRESH=True to start over (the old file is moved aside), or choose another OUT_DIR."
        )


def move_aside(path: Path) -> Path | None:
    """Rename an unwanted checkpoint to `<name>.old-<timestamp>` instead of deleting it."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    return target
