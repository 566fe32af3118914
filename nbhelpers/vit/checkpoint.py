"""Atomic, resumable checkpoints: last.pt (everything needed to continue) and best.pt (weights).

A checkpoint is written to a temp file in the same folder and moved into place with os.replace, so a
session that dies mid-write leaves the previous good file intact.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nbhelpers.platform import atomic_write
from nbhelpers.vit.config import Config
from nbhelpers.vit.state import TrainState

# Fields that may differ between the run that wrote a checkpoint and the run resuming it: they change
# where and how fast we run, not what is trained.
RUNTIME_FIELDS = {
    "data_root", "out_dir", "device", "precision", "compile", "resume", "fresh", "stop_after_epochs",
    "log_every", "checkpoint_minutes", "report_plots", "eval_batch_size", "tta", "resume_from",
    "eval_every", "eval_final_epochs", "time_budget_minutes",  # a budget-sized schedule is restored from the checkpoint
}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says how to proceed."""


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """torch.save through a temp file and os.replace: never a partial file at `path`."""
    atomic_write(path, lambda file: torch.save(payload, file))


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` hold the same bytes as `source` atomically: a hard link where the file system allows."""
    temp = target.with_name(f".{target.name}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
        os.replace(temp, target)
    except OSError:
        temp.unlink(missing_ok=True)
        with open(source, "rb") as original:  # streamed: checkpoints can be hundreds of MB
            atomic_write(target, lambda file: shutil.copyfileobj(original, file))


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


# ----------------------------------------------------------------------------- training state on disk


def adopt_checkpoint(source: Path, last: Path) -> None:
    """Copy RESUME_FROM (a last.pt, or a folder holding one) into OUT_DIR, e.g. a previous Kaggle version's output."""
    found = [source] if source.is_file() else sorted(source.rglob("last.pt")) if source.is_dir() else []
    if not found:
        raise FileNotFoundError(f"RESUME_FROM={str(source)!r} is not a last.pt file nor a folder containing one. "
                                "Point it at the previous run's OUT_DIR (on Kaggle: its output attached under /kaggle/input).")
    load_checkpoint(found[0])  # refuse a corrupt file before copying it
    link_or_copy(found[0], last)
    print(f"RESUME_FROM: continuing {found[0]} (copied to {last}).")


def restore_or_start(state: TrainState, config: Config, out_dir: Path) -> None:
    """Resume from last.pt when allowed; FRESH moves old checkpoints aside instead of deleting them."""
    last = out_dir / "last.pt"
    if config.train.fresh:
        for name in ("last.pt", "best.pt"):
            moved = move_aside(out_dir / name)
            if moved:
                print(f"FRESH=True: moved {name} aside to {moved.name}")
        return
    if not last.exists() and config.train.resume_from:
        adopt_checkpoint(Path(config.train.resume_from).expanduser(), last)
    if not last.exists():
        return
    if not config.train.resume:
        raise CheckpointError(f"{last} exists and RESUME=False. Set RESUME=True to continue it, FRESH=True to start over, or choose another OUT_DIR.")
    payload = load_checkpoint(last)
    check_compatible(payload["config"], config.to_dict(), last)
    state.load(payload)
    print(f"Resumed from {last} at step {state.step} (epoch {len(state.history)}).")


def save_last(state: TrainState, config: Config, out_dir: Path) -> None:
    atomic_torch_save(state.payload(config), out_dir / "last.pt")


def save_best(state: TrainState, config: Config, out_dir: Path, epoch: int) -> None:
    """best.pt holds the same full state as last.pt, plus which epoch it is and its validation accuracy."""
    payload = state.payload(config) | {"epoch": epoch, "val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None}
    atomic_torch_save(payload, out_dir / "best.pt")
