"""When the training loop evaluates and checkpoints, and how many steps fit in a time budget.

Pure bookkeeping on measured wall-clock times: the loop in train.py asks these functions and acts. Keeping the
decisions here makes them testable without training, and keeps per-epoch overhead a stated fraction of the run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

EVAL_SHARE = 0.05  # evaluation may cost at most this fraction of training time (auto schedule)


@dataclass
class LoopClock:
    """Wall-clock measurements of one `fit` call (seconds, time.monotonic)."""

    started: float = field(default_factory=time.monotonic)  # when fit() began (data loading and compile included)
    last_save: float = field(default_factory=time.monotonic)  # when last.pt was last written (or the call began)
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each full epoch of this call
    eval_seconds: list[float] = field(default_factory=list)  # duration of each per-epoch evaluation
    checkpoint_seconds: float = 0.0  # duration of the latest last.pt write
    step_seconds: float | None = None  # steady-state seconds per step (compile and warm-up excluded)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def checkpoint_due(self, minutes: float) -> bool:
        """True once `minutes` have passed since the last write (0 = always)."""
        return time.monotonic() - self.last_save >= minutes * 60


def evaluation_epochs(epochs: int, every: int, final_epochs: int) -> set[int]:
    """1-based epochs evaluated: the first (it measures the cost), every `every`-th, and the last `final_epochs`."""
    chosen = {1, epochs} | set(range(every, epochs + 1, every))
    return chosen | set(range(max(1, epochs - final_epochs + 1), epochs + 1))


def auto_eval_every(epochs: int, final_epochs: int, eval_seconds: float, epoch_seconds: float) -> int:
    """The smallest spacing k whose `evaluation_epochs` cost <= EVAL_SHARE of the training time.

    The first, last and final epochs are always evaluated; when they alone exceed the share (very short runs),
    the periodic ones are dropped (k = epochs).
    """
    if epoch_seconds <= 0 or eval_seconds <= 0:
        return 1
    allowed = EVAL_SHARE * epochs * epoch_seconds
    return next((every for every in range(1, epochs + 1)
                 if len(evaluation_epochs(epochs, every, final_epochs)) * eval_seconds <= allowed), epochs)


def plan_budget(budget_seconds: float, clock: LoopClock, step: int, steps_per_epoch: int,
                checkpoint_minutes: float, final_epochs: int) -> dict[str, Any]:
    """Total steps that end training (final evaluation and checkpoint included) within the budget.

    Args:
        budget_seconds: the whole fit() call's allowance, measured from `clock.started`.
        clock: with step_seconds, one evaluation and one checkpoint measured.
        step: steps already taken.
    Returns:
        {"total_steps", "steps_per_second", "seconds_per_step_with_overhead", ...} for the checkpoint and summary.
    """
    step_seconds = clock.step_seconds or 1.0
    evaluation = max(clock.eval_seconds, default=0.0)
    epoch_seconds = steps_per_epoch * step_seconds
    checkpoints_per_epoch = epoch_seconds / (checkpoint_minutes * 60) if checkpoint_minutes > 0 else 1.0
    per_step = step_seconds * (1 + EVAL_SHARE) + checkpoints_per_epoch * clock.checkpoint_seconds / steps_per_epoch
    # the end: the last epochs' evaluations, the final (flip-TTA) evaluation, the last checkpoints, the summary
    reserve = (final_epochs + 3) * evaluation + 2 * clock.checkpoint_seconds
    remaining = budget_seconds - clock.elapsed() - reserve
    total = step + max(0, int(remaining / per_step))
    return {"budget_seconds": budget_seconds, "total_steps": total, "steps_per_second": 1.0 / step_seconds,
            "seconds_per_step_with_overhead": per_step, "reserved_seconds": reserve,
            "planned_at_step": step, "planned_after_seconds": clock.elapsed()}
