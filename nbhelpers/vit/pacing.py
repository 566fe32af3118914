"""When the training loop evaluates and checkpoints, how fast it steps, and how many steps fit in a time budget.

Pure bookkeeping on measured wall-clock times: the loop in train.py asks these functions and acts. Keeping the
decisions here makes them testable without training, and keeps per-epoch overhead a stated fraction of the run.
Every time the loop reads comes from `LoopClock.now` (time.monotonic), so one stub drives all of it in tests.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

EVAL_SHARE = 0.05  # evaluation may cost at most this fraction of training time (auto schedule)
REPLAN_TOLERANCE = 0.05  # a budgeted run is re-planned when its projected end is off by more than this share (or an epoch)
WARMUP_STEPS = 2  # a call's first steps compile and warm up (allocator, autotuning): never timed
PROBE_STEPS = 3  # the steps after them that time the first estimate (the loop syncs with the host after each group)


@dataclass
class LoopClock:
    """Wall-clock measurements of a training run (seconds, time.monotonic), earlier sessions included once resumed."""

    started: float = field(default_factory=lambda: time.monotonic())  # when the run began, less earlier sessions' time
    last_save: float = field(default_factory=lambda: time.monotonic())  # when last.pt was last written (or the call began)
    mark: float = 0.0  # the end of the last timed window of steps (set at each host sync)
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each full epoch of this call
    eval_seconds: list[float] = field(default_factory=list)  # duration of each per-epoch evaluation
    checkpoint_seconds: float = 0.0  # duration of the latest last.pt write
    steady: list[float] = field(default_factory=lambda: [0.0, 0])  # [seconds, steps] after this call's warm-up
    epoch_steady: list[float] = field(default_factory=lambda: [0.0, 0])  # the same, within the current epoch
    epoch_step_seconds: list[float] = field(default_factory=list)  # seconds per step of each epoch, warm-up excluded
    estimated: bool = False  # whether the time estimate was printed in this call

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def elapsed(self) -> float:
        return self.now() - self.started

    def resume(self, earlier_seconds: float) -> None:
        """Count the run's earlier sessions (saved in last.pt) as if this one had started that much sooner."""
        self.started -= earlier_seconds

    def checkpoint_due(self, minutes: float) -> bool:
        """True once `minutes` have passed since the last write (0 = always)."""
        return self.now() - self.last_save >= minutes * 60

    def sync_due(self, steps_this_call: int) -> bool:
        """Extra host syncs at the end of warm-up and of the probe, so the estimate comes after a few steps."""
        return not self.estimated and steps_this_call in (WARMUP_STEPS, WARMUP_STEPS + PROBE_STEPS)

    def start_epoch(self) -> None:
        self.mark, self.epoch_steady = self.now(), [0.0, 0]

    def lap(self, steps_this_call: int, window_steps: int) -> float:
        """At a host sync: the seconds of the last `window_steps` steps; counted as steady unless warm-up is in them."""
        now = self.now()
        seconds, self.mark = now - self.mark, now
        if steps_this_call - window_steps >= WARMUP_STEPS:
            for totals in (self.steady, self.epoch_steady):
                totals[0], totals[1] = totals[0] + seconds, totals[1] + window_steps
        return seconds

    def end_epoch(self, steps: int, seconds: float) -> None:
        """Record the epoch's speed from its steady steps; an epoch with none (all compile and warm-up, e.g. the last
        steps of an epoch a resume finishes) records nothing, so no plan is made from compile time."""
        seconds_timed, steps_timed = self.epoch_steady
        if steps_timed:
            self.epoch_step_seconds.append(seconds_timed / steps_timed)

    @property
    def step_seconds(self) -> float | None:
        """What a plan uses: the median speed of the last 3 epochs (a slowdown counts from its second epoch on; one
        epoch slowed by a passing load does not move the schedule)."""
        return statistics.median(self.epoch_step_seconds[-3:]) if self.epoch_step_seconds else None

    def estimate_ready(self) -> float | None:
        """Steady seconds per step once PROBE_STEPS steps after warm-up are timed and no estimate was printed yet."""
        if self.estimated or self.steady[1] < PROBE_STEPS:
            return None
        self.estimated = True
        return self.steady[0] / self.steady[1]


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
        budget_seconds: the whole run's allowance (all sessions), measured from `clock.started`.
        clock: with step_seconds measured (recent epochs' speed); evaluation and checkpoint costs count once measured.
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


def replan_due(plan: dict[str, Any], planned_steps: int, steps_per_epoch: int) -> bool:
    """Whether a fresh `plan_budget` differs from the schedule in force by more than REPLAN_TOLERANCE of the budget
    or one epoch's time: then the run is behind (or well ahead), and timing noise alone does not move the schedule."""
    drift = abs(plan["total_steps"] - planned_steps) * plan["seconds_per_step_with_overhead"]
    return drift > max(REPLAN_TOLERANCE * plan["budget_seconds"], steps_per_epoch * plan["seconds_per_step_with_overhead"])
