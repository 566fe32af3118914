"""Atomic, resumable checkpoints: last.pt (everything needed to continue) and best.pt (weights).

A checkpoint is written to a temp file in the same folder and moved into place with os.replace, so a
session that dies mid-write leaves the previous good file intact.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nbhelpers.platform import DiskFullError, atomic_write, check_free_space
from nbhelpers.vit.config import Config
from nbhelpers.vit.state import REPORT_FILES, TrainState

# Fields that may differ between the run that wrote a checkpoint and the run resuming it: they change
# where and how fast we run, not what is trained.
RUNTIME_FIELDS = {
    "data_root", "out_dir", "device", "precision", "compile", "resume", "fresh", "stop_after_epochs",
    "log_every", "checkpoint_minutes", "report_plots", "eval_batch_size", "tta", "resume_from",
    "eval_every", "eval_final_epochs", "time_budget_minutes",  # a budget-sized schedule is restored from the checkpoint
}
# Optimisation settings a resume may change (with a printed note): the fixes a divergence message advises.
OPTIMISATION_FIELDS = {"lr", "min_lr", "grad_clip"}
# Keys every last.pt holds; a file without them is refused like a corrupt one.
REQUIRED_KEYS = {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "step", "history", "best_val_accuracy",
                 "train_seconds", "config"}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says how to proceed."""


def atomic_torch_save(payload: dict[str, Any], path: Path) -> None:
    """torch.save through a temp file and os.replace: never a partial file at `path`."""
    atomic_write(path, lambda file: torch.save(payload, file))


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` hold the same bytes as `source` atomically: a hard link where the file system allows."""
    if target.exists() and os.path.samefile(source, target):
        return  # already linked (a finished run re-run); os.replace onto the same file would leave the temp behind
    temp = target.with_name(f".{target.name}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
        os.replace(temp, target)
    except OSError:
        temp.unlink(missing_ok=True)
        with open(source, "rb") as original:  # streamed: checkpoints can be hundreds of MB
            atomic_write(target, lambda file: shutil.copyfileobj(original, file))


def corrupt_error(path: Path, detail: str) -> CheckpointError:
    """The one refusal for a checkpoint that cannot be used as it is: the file is left untouched."""
    return CheckpointError(
        f"{path} is corrupt, truncated or malformed ({detail}). It was left untouched. "
        "Set FRESH=True to move it aside and start over, or choose another OUT_DIR."
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU; raise CheckpointError (file untouched) when it is corrupt, truncated or malformed."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated zip archives
        raise corrupt_error(path, f"{type(error).__name__}: {error}") from error
    if not isinstance(payload, dict):
        raise corrupt_error(path, f"it holds a {type(payload).__name__}, not a checkpoint of this trainer")
    missing = REQUIRED_KEYS - set(payload)
    if missing:
        raise corrupt_error(path, f"it lacks {sorted(missing)}: not a complete checkpoint of this trainer")
    if not isinstance(payload["config"], dict) or not isinstance(payload["step"], int):
        raise corrupt_error(path, "its config or step is not what this trainer writes")
    return payload


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> list[str]:
    """Refuse to resume when the checkpoint was trained with a different model or recipe.

    Returns:
        The changed optimisation settings (OPTIMISATION_FIELDS), as 'name old -> new' notes; these are allowed.
    """
    differences, allowed = [], []
    for section in ("model", "augment", "train"):
        for key, value in current[section].items():
            if section == "train" and key in RUNTIME_FIELDS:
                continue
            old = saved.get(section, {}).get(key)
            if isinstance(value, tuple):
                old = tuple(old) if isinstance(old, (list, tuple)) else old
            if old != value:
                (allowed if section == "train" and key in OPTIMISATION_FIELDS else differences).append(f"{key}: checkpoint {old!r} vs now {value!r}")
    if differences:
        raise CheckpointError(
            f"{path} was written by a different configuration ({'; '.join(differences[:5])}). "
            "Use the same parameters to resume (only LR, MIN_LR, GRAD_CLIP and PRECISION may change), "
            "set FRESH=True to start over (the old file is moved aside), or choose another OUT_DIR."
        )
    return allowed


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


def move_previous_run_aside(out_dir: Path) -> None:
    """FRESH: rename the old checkpoints, summary and plots to `<name>.old-<timestamp>` (nothing is deleted)."""
    for name in ("last.pt", "best.pt", *REPORT_FILES):
        moved = move_aside(out_dir / name)
        if moved:
            print(f"FRESH=True: moved {name} aside to {moved.name}")


def restore_or_start(state: TrainState, config: Config, out_dir: Path) -> None:
    """Resume from last.pt when allowed; FRESH moves old checkpoints aside instead of deleting them."""
    last = out_dir / "last.pt"
    if config.train.fresh:
        move_previous_run_aside(out_dir)
        return
    if not last.exists() and config.train.resume_from:
        adopt_checkpoint(Path(config.train.resume_from).expanduser(), last)
    if not last.exists():
        return
    if not config.train.resume:
        raise CheckpointError(f"{last} exists and RESUME=False. Set RESUME=True to continue it, FRESH=True to start over, or choose another OUT_DIR.")
    payload = load_checkpoint(last)
    changed = check_compatible(payload["config"], config.to_dict(), last)
    try:
        state.load(payload)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:  # wrong shapes, missing parts
        raise corrupt_error(last, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}") from error
    if not state.weights_are_finite():
        raise corrupt_error(last, "its weights are NaN or infinite, written before finite checks existed")
    if changed:  # the schedule's peak and floor come from the config, so the LR follows at once
        print(f"Resuming with changed optimisation settings ({'; '.join(changed)}).")
    print(f"Resumed from {last} at step {state.step} ({state.position()}).")


def divergence_error(state: TrainState, config: Config, out_dir: Path, cause: str) -> FloatingPointError:
    """Training diverged: say what is kept (true whether or not a checkpoint exists) and which settings to change.

    Only changes that would make a difference are named: GRAD_CLIP when clipping is off, PRECISION when autocast is on.
    """
    last = out_dir / "last.pt"
    if state.saved_step is not None and last.exists():
        kept = f"The last finite checkpoint {last} (step {state.saved_step}) is kept; running again resumes from it."
    else:
        kept = "No checkpoint was written yet (nothing non-finite is saved), so running again starts from step 0."
    fixes = [f"Lower LR (now {config.train.lr:g})"]
    fixes += ["set GRAD_CLIP=1.0"] if config.train.grad_clip <= 0 else []
    fixes += ["set PRECISION='fp32'"] if state.autocast else []
    advice = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    return FloatingPointError(f"{cause} at step {state.step}. {kept} {advice}, then run again: a resume may change "
                              f"{'those settings' if len(fixes) > 1 else 'it'}.")


def checkpoint_bytes(state: TrainState) -> int:
    """About how large last.pt is: weights, AdamW's two moments, the EMA copy, plus 1 MB of history and RNG state."""
    weights = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
    return weights * (3 + (state.ema is not None)) + 1_000_000


def check_space_for_checkpoints(state: TrainState, config: Config, out_dir: Path) -> None:
    """Before training: room for one more last.pt (and a separate best.pt when a validation split picks it)."""
    copies = 2 if config.train.val_size > 0 else 1
    check_free_space(out_dir, copies * checkpoint_bytes(state), f"writing {copies} checkpoint(s) of this model")


def _save(state: TrainState, config: Config, out_dir: Path, name: str, extra: dict[str, Any]) -> None:
    """Write a checkpoint only when every weight is finite; a full disk becomes a one-line DiskFullError."""
    if not state.weights_are_finite():
        raise divergence_error(state, config, out_dir, "The weights became NaN or infinite")
    try:
        atomic_torch_save(state.payload(config) | extra, out_dir / name)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a failed write as RuntimeError
        needed, free = checkpoint_bytes(state), shutil.disk_usage(out_dir).free
        if getattr(error, "errno", None) != errno.ENOSPC and free >= needed:
            raise
        previous = f"the previous {name} is intact" if (out_dir / name).exists() else f"no {name} was written before"
        raise DiskFullError(f"No space left in {out_dir} for {name}: {previous}. It needs about {needed / 1e6:,.0f} MB "
                            f"({free / 1e6:,.0f} MB free); free some space and run again to resume.") from None


def save_last(state: TrainState, config: Config, out_dir: Path) -> None:
    _save(state, config, out_dir, "last.pt", {})
    state.saved_step = state.step


def save_best(state: TrainState, config: Config, out_dir: Path, epoch: int) -> None:
    """best.pt holds the same full state as last.pt, plus which epoch it is and its validation accuracy."""
    _save(state, config, out_dir, "best.pt",
          {"epoch": epoch, "val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None})
