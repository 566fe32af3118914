"""What a training run carries and saves: the EMA of the weights, the LR schedule, the loop's mutable state, RNG
state, the result.

Model-independent of the loop itself: checkpoint, evaluate and report read these types, and train builds them.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nbhelpers.vit.config import Config
from nbhelpers.vit.data import DataSplits
from nbhelpers.vit.model import VisionTransformer

# ----------------------------------------------------------------------------- EMA

# The plots report.py draws (<name>.png) and the files it writes beside the checkpoints; FRESH moves these aside too,
# so no old result sits beside a new run.
REPORT_PLOTS = ("curves", "confusion", "misclassified", "attention")
REPORT_FILES = ("run_summary.json", *(f"{name}.png" for name in REPORT_PLOTS))



class ModelEma(nn.Module):
    """Exponential moving average of a model's weights, updated on the device without host syncs.

    The decay ramps up as timm's does, min(decay, (1 + step) / (10 + step)): early on the average follows the
    model closely, so a short run's EMA is not still partly the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step `step` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def warmed_up(self, steps: int) -> bool:
        """Whether the ramp has reached the configured decay after `steps` updates."""
        return steps > 0 and self.decay_at(steps - 1) >= self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        if self._pairs is None:  # built once: load_state_dict copies in place, so these tensors stay the live ones
            pairs = [(e, m) for e, m in zip(self.module.state_dict().values(), model.state_dict().values()) if e.dtype.is_floating_point]
            self._pairs = ([e for e, _ in pairs], [m for _, m in pairs])
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1.0 - self.decay_at(step))


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (augmentation runs on the device's generator)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # the current device only: resuming on a machine with another GPU count works
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and isinstance(state["cuda"], torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"])
    elif torch.cuda.is_available():
        warnings.warn("The checkpoint holds no CUDA RNG state (it was written on another device): augmentation "
                      "after the resume will not replay the interrupted run exactly.", stacklevel=2)


# ----------------------------------------------------------------------------- schedule, loop state, result


@dataclass
class Schedule:
    """Learning rate per optimizer step: linear warm-up to `peak_lr`, then cosine to `min_lr` at the last step.

    A time budget sizes it after the first epoch and shortens it when the run falls behind (`resize`): the cosine
    then goes on from where it is and reaches `min_lr` at the new last step. A resume keeps a budget-sized length;
    `peak_lr` and `min_lr` always come from the current config (a resume may change them).
    """

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float
    resized_at: int = 0  # the step from which the rest of the cosine was squeezed into fewer steps (0 = never)
    progress_at_resize: float = 0.0  # how far (0..1) the cosine had got at `resized_at`

    def progress(self, step: int) -> float:
        """How far (0..1) the cosine phase is at `step`."""
        if self.resized_at and step >= self.resized_at:
            done = (step - self.resized_at) / max(1, self.total_steps - 1 - self.resized_at)
            return self.progress_at_resize + (1.0 - self.progress_at_resize) * min(1.0, done)
        return min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - 1 - self.warmup_steps))

    def lr(self, step: int) -> float:
        """The learning rate of 0-based optimizer step `step`."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * self.progress(step)))

    def resize(self, total_steps: int, step: int) -> None:
        """End at `total_steps`, going on from `step`. After warm-up the LR at `step` is kept and the cosine goes on
        from there; during warm-up, warm-up takes at most a quarter of the new length (never less than is done), so
        a run resized much shorter warms up faster from here and still has most of its steps for the decay."""
        if step > self.warmup_steps:
            self.progress_at_resize, self.resized_at = self.progress(step), step
        else:
            self.warmup_steps = min(self.warmup_steps, max(step, total_steps // 4))
        self.total_steps = total_steps


@dataclass
class TrainState:
    """Everything the loop mutates; saved whole in last.pt."""

    model: VisionTransformer
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    train_seconds: float = 0.0  # time in training steps, summed over sessions
    wall_seconds: float = 0.0  # wall-clock time of training + per-epoch evaluation, summed over sessions
    run_seconds: float = 0.0  # the whole run (start-up, compile, checkpoints included) up to the last save, all sessions
    saved_step: int | None = None  # step of the last.pt on disk (loaded or written in this session); not saved
    budget_plan: dict[str, Any] | None = None  # what the time budget measured and chose (None = sized by epochs)
    autocast: bool = False  # whether steps run under bf16/fp16 autocast (this session's runtime); not saved

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def weights_are_finite(self) -> bool:
        """True when no weight of the model or its EMA is NaN or infinite (one host sync)."""
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        tensors = [t for module in modules for t in module.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def position(self) -> str:
        """Where `step` lies: 'end of epoch 3' or 'epoch 4, 15 steps in'."""
        done = self.history[-1]["step"] if self.history else 0
        if self.history and done == self.step:
            return f"end of epoch {len(self.history)}"
        return f"epoch {len(self.history) + 1}, {self.step - done} steps in"

    def payload(self, config: Config) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": dataclasses.asdict(self.schedule),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "step": self.step,
            "history": self.history, "best_val_accuracy": self.best_val_accuracy,
            "train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds, "run_seconds": self.run_seconds,
            "config": config.to_dict(), "budget_plan": self.budget_plan,
        }

    def load(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.module.load_state_dict(payload["ema"])
        fused = [group.get("fused") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(payload["optimizer"])
        for group, flag in zip(self.optimizer.param_groups, fused):  # this machine decides (CPU run resumed on CUDA)
            group["fused"] = flag
        if payload["scaler"]:  # empty when written under bf16/fp32; resuming as fp16 then starts a fresh scale
            self.scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        self.step, self.history = payload["step"], payload["history"]
        self.best_val_accuracy, self.train_seconds = payload["best_val_accuracy"], payload["train_seconds"]
        self.wall_seconds, self.run_seconds = payload.get("wall_seconds", 0.0), payload.get("run_seconds", 0.0)
        self.saved_step = self.step
        if payload.get("budget_plan"):  # a budget-sized schedule is kept on resume; an epoch-sized one follows EPOCHS
            saved = payload["scheduler"] if "total_steps" in payload["scheduler"] else payload  # older files: top level
            lengths = {name: saved[name] for name in ("total_steps", "warmup_steps", "resized_at", "progress_at_resize") if name in saved}
            self.schedule = dataclasses.replace(self.schedule, **lengths)
            self.budget_plan = payload["budget_plan"]


@dataclass
class FitResult:
    """What `fit` hands to the report and the notebook."""

    config: Config
    out_dir: Path
    status: str  # "finished" | "stopped" (stop_after_epochs reached)
    step: int  # optimizer steps taken in total (across resumes)
    history: list[dict[str, Any]]
    summary: dict[str, Any]  # run_summary.json content ({} when stopped early)
    model: VisionTransformer | None = None  # the weights the final accuracy was measured with (EMA if on)
    data: DataSplits | None = None
    final_predictions: np.ndarray | None = None  # (N_test,) predictions of `model` (with TTA if on)


RESULTS_SAVED = "results saved:"  # starts the line rank 0 prints once every file of a run is written


def results_saved_line(result: FitResult) -> str:
    """The line `python -m nbhelpers.vit` prints when `fit` has returned, i.e. every output is on disk."""
    record = "run_summary.json" if result.status == "finished" else "last.pt"
    return f"{RESULTS_SAVED} {result.status} at step {result.step}, {result.out_dir / record}"
