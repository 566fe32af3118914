"""`fit(config)`: train a ViT on CIFAR-10 with the data and augmentation on the device, resumably.

Read from `fit` down: its loop calls `train_one_epoch`, which calls `train_step` (one optimizer step) and syncs
with the host only every `log_every` steps (`end_window`: progress bar, NaN check, time estimate); `end_epoch`
sizes the time budget, evaluates and checkpoints. `Loop` holds what one fit() call trains with; `TrainState` is
what last.pt saves.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nbhelpers import distributed
from nbhelpers.platform import (
    RunLock, Runtime, StopRequested, StopSignals, ensure_writable_dir, progress_bar, remove_stale_temp_files, resolve_paths, select_runtime,
)
from nbhelpers.vit import report
from nbhelpers.vit.augment import GpuAugment
from nbhelpers.vit.checkpoint import (
    check_space_for_checkpoints, divergence_error, link_or_copy, restore_or_start, save_best, save_last,
)
from nbhelpers.vit.config import PRESETS, Config
from nbhelpers.vit.data import DataSplits, load_data
from nbhelpers.vit.evaluate import DeviceData, evaluate_epoch, format_epoch, to_device
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.pacing import LoopClock, auto_eval_every, evaluation_epochs, plan_budget, replan_due
from nbhelpers.vit.state import FitResult, ModelEma, Schedule, TrainState

LONG_RUN_SECONDS = 3600  # estimates above this say so and name a quicker preset (never a refusal)


@dataclass
class Loop:
    """What one fit() call trains with, besides the TrainState that last.pt saves."""

    config: Config
    runtime: Runtime
    state: TrainState
    splits: DataSplits | None  # the data set as loaded (classes, source) for the report
    data: DeviceData  # the same images and labels on the device
    out_dir: Path
    network: torch.nn.Module  # the model as the step runs it: DDP-wrapped, compiled when compile is on
    augment: GpuAugment
    eval_models: dict[str, torch.nn.Module]  # raw and EMA networks for per-epoch evaluation, compiled likewise
    clock: LoopClock
    bar: tqdm
    signals: StopSignals | None = None
    first_step: int = 0  # state.step when this call began
    eval_every: int = 1  # the automatic evaluation spacing once measured (EVAL_EVERY=0)
    epochs_done: int = 0  # epochs ended in this call

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.train_labels) // self.config.train.batch_size


def fit(config: Config) -> FitResult:
    """Train (or resume) the configured ViT, evaluate it and write the report files.

    Under `torchrun --nproc_per_node=N` every process calls this; rank 0 writes the files and returns the full
    result, the other ranks return a FitResult with an empty summary. OUT_DIR is locked for the run (rank 0 holds
    the lock; a second run into it is refused). SIGINT / SIGTERM save last.pt at the next step and raise
    StopRequested (a KeyboardInterrupt; the CLI exits 130 / 143).

    Args:
        config: from `build_config(preset, **overrides)`.
    Returns:
        FitResult; `summary` is what run_summary.json holds once training finished.
    """
    with open_loop(config) as loop:
        while loop.state.step < loop.state.total_steps:
            record = train_one_epoch(loop)
            if not end_epoch(loop, record):  # STOP_AFTER_EPOCHS reached
                return FitResult(config, loop.out_dir, "stopped", loop.state.step, loop.state.history, {})
        return finish_run(loop)


def train_one_epoch(loop: Loop) -> dict[str, Any]:
    """Finish the epoch `state.step` is in (or stop at the schedule's end); return its training record.

    A stop request (SIGINT/SIGTERM) saves last.pt at the next step boundary and raises StopRequested.
    """
    state, train, clock = loop.state, loop.config.train, loop.clock
    epoch, offset = divmod(state.step, loop.steps_per_epoch)
    end = min(loop.steps_per_epoch, state.total_steps - epoch * loop.steps_per_epoch)
    images, labels = loop.data.train_images, loop.data.train_labels
    order = epoch_order(train.seed, epoch, len(labels), labels.device)
    mix = epoch < math.ceil(state.total_steps / loop.steps_per_epoch) - loop.config.augment.mix_off_epochs
    sums = torch.zeros(2, device=order.device)  # [loss sum, correct predictions] of this rank
    clock.start_epoch()
    started, window = clock.mark, 0
    for index in range(offset, end):
        batch = distributed.shard(order[index * train.batch_size:(index + 1) * train.batch_size])
        loss, correct = train_step(loop, images[batch], labels[batch], mix)
        sums[0] += loss
        sums[1] += correct
        state.step, window = state.step + 1, window + 1
        at_window = window == train.log_every or index == end - 1 or clock.sync_due(state.step - loop.first_step)
        if index < end - 1 and stop_requested(loop.signals, order.device, at_window):  # an epoch's last step: end_epoch
            account(loop, window)
            stop_now(loop)
        if at_window:
            end_window(loop, sums, window, epoch, index + 1 - offset, last=index == end - 1)
            window = 0
    done, seconds = end - offset, clock.now() - started
    clock.end_epoch(done, seconds)
    return {"epoch": epoch + 1, **epoch_record(loop, sums, done, seconds), "mix": mix, "steps": done}


def train_step(loop: Loop, images: torch.Tensor, labels: torch.Tensor, mix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's slice of a global batch (DDP averages the gradients); no host sync.

    Returns:
        The batch's loss (computed before the update) and its count of correct predictions, on the device.
    """
    state, clip = loop.state, loop.config.train.grad_clip
    inputs, targets = loop.augment(images, labels, mix=mix)  # (B, 3, H, W) float, (B, C) soft targets
    with loop.runtime.autocast():
        logits = loop.network(inputs)
    loss = F.cross_entropy(logits.float(), targets)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    for group in state.optimizer.param_groups:
        group["lr"] = state.schedule.lr(state.step)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(state.model, state.step)
    return loss.detach(), (logits.argmax(-1) == targets.argmax(-1)).sum()


def end_window(loop: Loop, sums: torch.Tensor, window: int, epoch: int, done: int, last: bool) -> None:
    """The host sync every `log_every` steps: NaN check, timing, progress bar, the time estimate, a due checkpoint."""
    state, clock = loop.state, loop.clock
    check_finite(distributed.all_reduce_sum(sums[:1].clone()), state, loop.out_dir, loop.config)  # the one host sync
    seconds = account(loop, window)
    show_progress(loop.bar, state, epoch, sums, done, loop.config.train.batch_size, window / max(seconds, 1e-9))
    step_seconds = clock.estimate_ready()  # every rank asks, so they agree on when the extra syncs stop
    if step_seconds is not None and not loop.bar.disable:
        tqdm.write(announce_estimate(state.total_steps - loop.first_step, step_seconds, loop.runtime, loop.config.preset))
    if not last and clock.checkpoint_due(loop.config.train.checkpoint_minutes):
        save_checkpoint(loop)  # wall-clock checkpoint inside long epochs


def end_epoch(loop: Loop, record: dict[str, Any]) -> bool:
    """Size the time budget, evaluate on schedule, record the epoch, checkpoint; False when this call stops here."""
    state, train, clock = loop.state, loop.config.train, loop.clock
    if record["steps"] == loop.steps_per_epoch:
        clock.epoch_seconds.append(record["epoch_seconds"])
    planned = bool(train.time_budget_minutes) and plan_time_budget(loop)  # first: it may make this epoch the last
    evaluate_if_scheduled(loop, record)
    state.history.append(record)
    if distributed.is_main():
        tqdm.write(format_epoch(record, math.ceil(state.total_steps / loop.steps_per_epoch)))
    loop.epochs_done += 1
    finished = state.step >= state.total_steps
    stopping = train.stop_after_epochs is not None and loop.epochs_done >= train.stop_after_epochs and not finished
    saving = finished or stopping or planned or clock.checkpoint_due(train.checkpoint_minutes)
    if saving:  # a new plan is saved at once: a session killed later resumes with it and this epoch's record
        save_checkpoint(loop)
    if not finished and stop_requested(loop.signals, loop.data.train_labels.device, at_window=True):
        stop_now(loop, save=not saving)
    if stopping and distributed.is_main():
        print(f"Stopped after {loop.epochs_done} epoch(s) as asked (STOP_AFTER_EPOCHS); run again with the same OUT_DIR to resume.")
    return not stopping


# ----------------------------------------------------------------------------- setting up and finishing


@contextlib.contextmanager
def open_loop(config: Config) -> Iterator[Loop]:
    """OUT_DIR locked (by rank 0), stop signals caught, data and state on the device, the progress bar open."""
    clock = LoopClock()  # start-up counts towards a time budget
    device = distributed.init_from_env(config.train.device)
    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    with contextlib.ExitStack() as stack:
        out_dir = paths.out_dir
        if distributed.is_main():
            out_dir = ensure_writable_dir(out_dir, "OUT_DIR")
            stack.enter_context(RunLock(out_dir))
        signals = stack.enter_context(StopSignals())
        if distributed.is_main():
            cache = out_dir / "cache"  # a link (an ablation study's runs share one cache): other runs may be writing there
            removed = remove_stale_temp_files(out_dir) + (remove_stale_temp_files(cache) if cache.is_dir() and not cache.is_symlink() else [])
            if removed:
                print(f"Removed {len(removed)} temp file(s) left by an interrupted run: {', '.join(path.name for path in removed)}")
        loop = build_loop(config, device, paths.data_root, out_dir, signals, clock)
        with loop.bar:  # closed on errors too
            yield loop


def build_loop(config: Config, device: str | None, data_root: Path, out_dir: Path, signals: StopSignals, clock: LoopClock) -> Loop:
    """Runtime, data, the state (resumed from last.pt when there is one), the networks as run, the progress bar."""
    runtime = select_runtime(device, config.train.precision, config.train.compile, verbose=distributed.is_main())
    data = load_data_rank_by_rank(config, data_root, out_dir)
    check_batch_size(config, data)
    check_class_count(config, data)
    if distributed.is_main():
        print(f"data: {data.source} | train {len(data.train_labels)} val {len(data.val_labels)} test {len(data.test_labels)} | "
              f"out: {out_dir} | processes: {distributed.world_size()}")
    state = build_state(config, runtime, len(data.train_labels) // config.train.batch_size)
    restore_rank_by_rank(state, config, out_dir)
    clock.resume(state.run_seconds)
    if distributed.is_main():
        check_space_for_checkpoints(state, config, out_dir)
    if distributed.rank() > 0:  # rank 0 keeps the (restored) stream; the others draw their own augmentation
        torch.manual_seed(distributed.augmentation_seed(config.train.seed, state.step))
    bar = progress_bar(total=state.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not distributed.is_main())
    if not bar.disable and state.step < state.total_steps:
        tqdm.write("estimated training time on this device: estimating… (the first steps compile and warm up; the next few are timed)")
    return make_loop(config, runtime, state, data, to_device(data, runtime.device), out_dir, bar, signals, clock)


def make_loop(config: Config, runtime: Runtime, state: TrainState, splits: DataSplits | None, data: DeviceData, out_dir: Path,
              bar: tqdm, signals: StopSignals | None = None, clock: LoopClock | None = None) -> Loop:
    """A Loop around a built (or restored) state: the networks as the step runs them (DDP, compile), the augmentation.

    Args:
        splits: the data set as loaded, for the final report (None where only `train_one_epoch` is run).
        bar: the progress bar; the time estimate is printed only where it shows (rank 0).
    """
    compiled = torch.compile if runtime.compile else (lambda module: module)
    evaluated = {"raw": state.model} | ({"ema": state.ema.module} if state.ema is not None else {})
    state.model.train()
    return Loop(config, runtime, state, splits, data, out_dir, compiled(distributed.wrap_model(state.model)),
                GpuAugment(config.augment, config.model.num_classes), {name: compiled(model) for name, model in evaluated.items()},
                clock or LoopClock(), bar, signals, first_step=state.step)


def build_optimizer(model: VisionTransformer, config: Config, runtime: Runtime) -> torch.optim.AdamW:
    """AdamW with no weight decay on norms, biases, positions and tokens; fused on CUDA."""
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n not in skip]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n in skip]
    train = config.train
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, fused=runtime.is_cuda)


def build_state(config: Config, runtime: Runtime, steps_per_epoch: int) -> TrainState:
    """Model, EMA, optimizer, grad scaler and an LR schedule of EPOCHS (a time budget resizes it once measured)."""
    torch.manual_seed(config.train.seed)
    VisionTransformer.check_training_memory(config, runtime, distributed.world_size())  # refuse what cannot fit, before allocating
    model = VisionTransformer(config.model).to(runtime.device)
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, config, runtime)
    train = config.train
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    schedule = Schedule(train.epochs * steps_per_epoch, round(train.warmup_epochs * steps_per_epoch), train.lr, train.min_lr)
    return TrainState(model, ema, optimizer, scaler, schedule, autocast=runtime.amp_dtype is not None)


def finish_run(loop: Loop) -> FitResult:
    """After the last epoch: best.pt, then (rank 0) the final evaluation, run_summary.json and the plots."""
    state, config, out_dir = loop.state, loop.config, loop.out_dir
    devices = distributed.gather_objects(loop.runtime.description)
    if not distributed.is_main():
        return FitResult(config, out_dir, "finished", state.step, state.history, {})
    if len(loop.splits.val_labels) == 0:  # no validation split: best.pt is the final state, the same bytes as last.pt
        link_or_copy(out_dir / "last.pt", out_dir / "best.pt")
    elif not (out_dir / "best.pt").exists():
        save_best(state, config, out_dir, len(state.history))
    # report.finish times the run from a time.monotonic() start: the one that also counts earlier sessions
    run = {"world_size": distributed.world_size(), "devices": devices, "started_monotonic": time.monotonic() - loop.clock.elapsed()}
    return report.finish(state, config, loop.runtime, loop.splits, loop.data, out_dir, run)


# ----------------------------------------------------------------------------- pieces of the loop


def check_batch_size(config: Config, data: DataSplits) -> None:
    count = len(data.train_labels)
    if config.train.batch_size > count:
        raise ValueError(f"BATCH_SIZE={config.train.batch_size} is larger than the {count} training images. Set BATCH_SIZE <= {count}.")
    distributed.check_divisible(config.train.batch_size)


def check_class_count(config: Config, data: DataSplits) -> None:
    """The data's labels must fit the model's outputs (load_data already checked them against the class list)."""
    if len(data.classes) > config.model.num_classes:
        raise ValueError(f"The data set has {len(data.classes)} classes {data.classes} but NUM_CLASSES={config.model.num_classes}. "
                         f"Set NUM_CLASSES={len(data.classes)} or fix DATA_ROOT.")


def epoch_order(seed: int, epoch: int, count: int, device: torch.device) -> torch.Tensor:
    """The epoch's shuffle depends only on (seed, epoch), so a mid-epoch resume sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).to(device)


def check_finite(loss_sum: torch.Tensor, state: TrainState, out_dir: Path, config: Config) -> None:
    """Stop on a non-finite loss or weights: the loss is computed before each update, so the weights are checked too."""
    if not torch.isfinite(loss_sum).item():
        raise divergence_error(state, config, out_dir, f"Training loss became {loss_sum.item()}")
    if not state.weights_are_finite():
        raise divergence_error(state, config, out_dir, "The weights became NaN or infinite")


def account(loop: Loop, window: int) -> float:
    """Add the last `window` steps' time (since the previous sync) to the state's totals; return it."""
    seconds = loop.clock.lap(loop.state.step - loop.first_step, window)
    loop.state.train_seconds += seconds
    loop.state.wall_seconds += seconds
    return seconds


def announce_estimate(steps: int, seconds_per_step: float, runtime: Runtime, preset: str) -> str:
    """One line: the training time of `steps` at the steady speed; past an hour, which preset is quicker here."""
    seconds = steps * seconds_per_step
    duration = f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    text = f"estimated training time on this device: {duration} ({steps:,} steps at {seconds_per_step:.3g} s/step; compile and warm-up excluded)"
    if seconds <= LONG_RUN_SECONDS:
        return text
    if runtime.is_cuda:
        return text + ". Over an hour: TIME_BUDGET_MINUTES caps it, and PRESET='smoke' checks the whole notebook in a minute."
    quick = "cpu" if "cpu" in PRESETS and preset != "cpu" else "smoke"  # the preset made for CPUs, where there is one
    what = "is sized for a CPU" if quick == "cpu" else "checks the whole notebook in a minute"
    return text + f". Over an hour on this device: PRESET='{quick}' {what}, or use a GPU platform (Kaggle or Colab with a GPU)."


def stop_requested(signals: StopSignals | None, device: torch.device, at_window: bool) -> bool:
    """A SIGINT/SIGTERM arrived. Under torchrun the ranks agree at logging windows, so they stop at the same step."""
    if signals is None:
        return False
    if distributed.world_size() == 1:
        return signals.requested
    if not at_window:
        return False
    return distributed.all_reduce_sum(torch.tensor([float(signals.requested)], device=device)).item() > 0


def stop_now(loop: Loop, save: bool = True) -> None:
    """Save last.pt at this step boundary (unless just saved), say so and raise StopRequested."""
    if save:
        save_checkpoint(loop)
    message = f"stopped at step {loop.state.step}; run again to resume"
    if distributed.is_main():
        print(message, flush=True)
    raise StopRequested(message, loop.signals.received or 15)


def save_checkpoint(loop: Loop) -> None:
    """last.pt from rank 0 (the other ranks hold the same state), timed for the budget; not counted as step time."""
    clock = loop.clock
    loop.state.run_seconds = clock.elapsed()
    if distributed.is_main():
        start = clock.now()
        save_last(loop.state, loop.config, loop.out_dir)
        clock.checkpoint_seconds = clock.now() - start
    clock.last_save = clock.mark = clock.now()


def epoch_record(loop: Loop, sums: torch.Tensor, done: int, seconds: float) -> dict[str, Any]:
    """The epoch's training loss and accuracy over all ranks (`sums` = this rank's [loss sum, correct])."""
    loss_sum, correct = distributed.all_reduce_sum(sums.clone()).tolist()
    batch_size, state = loop.config.train.batch_size, loop.state
    return {"step": state.step, "train_loss": loss_sum / (done * distributed.world_size()),
            "train_accuracy": correct / (done * batch_size), "lr": state.schedule.lr(state.step),
            "images_per_second": done * batch_size / max(seconds, 1e-9), "epoch_seconds": seconds}


def show_progress(bar: tqdm, state: TrainState, epoch: int, sums: torch.Tensor, done: int, batch_size: int, steps_per_second: float) -> None:
    """Progress bar update (rank 0's slice of the batch; the epoch record holds all ranks')."""
    local_batch = batch_size // distributed.world_size()
    bar.set_postfix(epoch=epoch + 1, loss=f"{sums[0].item() / done:.3f}", acc=f"{sums[1].item() / (done * local_batch):.3f}",
                    img_s=f"{steps_per_second * batch_size:,.0f}", lr=f"{state.schedule.lr(state.step):.2e}")
    bar.update(state.step - bar.n)


def plan_time_budget(loop: Loop) -> bool:
    """Fit the schedule to TIME_BUDGET_MINUTES (rank 0 decides): sized after the first epoch from the measured speed,
    then resized from where it is whenever the run falls behind (or gets well ahead). True when the first plan was made."""
    state, train = loop.state, loop.config.train
    if loop.clock.step_seconds is None:
        return False  # no steady step timed yet (every rank has run the same steps): plan at a later epoch end
    plan = distributed.broadcast_from_main(plan_budget(
        train.time_budget_minutes * 60, loop.clock, state.step, loop.steps_per_epoch, train.checkpoint_minutes, train.eval_final_epochs))
    first, before = state.budget_plan is None, state.total_steps
    if not first and not replan_due(plan, before, loop.steps_per_epoch):
        return False  # on time: the schedule stays as planned
    state.schedule.resize(plan["total_steps"], state.step)
    state.budget_plan = plan | {"replans": 0 if first else state.budget_plan.get("replans", 0) + 1}
    loop.bar.total = state.total_steps
    loop.bar.refresh()
    if distributed.is_main():
        epochs = f"{state.total_steps / loop.steps_per_epoch:.1f} epochs"
        tqdm.write(f"TIME_BUDGET_MINUTES={train.time_budget_minutes} sizes the run: {plan['steps_per_second']:.2f} steps/s measured "
                   f"-> {state.total_steps} steps ({epochs}; EPOCHS={train.epochs} is ignored)." if first else
                   f"{'Behind' if state.total_steps < before else 'Ahead of'} the time budget at {plan['steps_per_second']:.2f} "
                   f"steps/s: the schedule now ends at step {state.total_steps} ({epochs}) instead of {before}.")
    return first


def evaluate_if_scheduled(loop: Loop, record: dict[str, Any]) -> None:
    """Evaluate on the schedule of `pacing.evaluation_epochs`; keep best.pt; time it for the schedule itself."""
    state, train, clock = loop.state, loop.config.train, loop.clock
    epochs = math.ceil(state.total_steps / loop.steps_per_epoch)
    if not train.eval_every and clock.eval_seconds and clock.epoch_seconds:
        loop.eval_every = distributed.broadcast_from_main(
            auto_eval_every(epochs, train.eval_final_epochs, clock.eval_seconds[-1], max(clock.epoch_seconds)))
    if record["epoch"] not in evaluation_epochs(epochs, train.eval_every or loop.eval_every, train.eval_final_epochs):
        return
    start = clock.now()
    record.update(evaluate_epoch(state, loop.data, loop.runtime, loop.config, loop.eval_models))
    clock.eval_seconds.append(clock.now() - start)
    state.wall_seconds += clock.eval_seconds[-1]
    score = record.get("ema_val_accuracy", record.get("val_accuracy", -1.0))
    if "val_accuracy" in record and score > state.best_val_accuracy:
        state.best_val_accuracy = score
        if distributed.is_main():
            save_best(state, loop.config, loop.out_dir, record["epoch"])


def load_data_rank_by_rank(config: Config, data_root: Path, out_dir: Path) -> DataSplits:
    """Rank 0 loads first (it may download and write the cache); the others then read the same files."""
    data = load_data(config.train, data_root, out_dir / "cache") if distributed.is_main() else None
    distributed.barrier()
    return data if data is not None else load_data(config.train, data_root, out_dir / "cache")


def restore_rank_by_rank(state: TrainState, config: Config, out_dir: Path) -> None:
    """Rank 0 applies FRESH / RESUME_FROM to the files; then every other rank loads what rank 0 left in place."""
    if distributed.is_main():
        restore_or_start(state, config, out_dir)
    distributed.barrier()
    if not distributed.is_main():
        followers = copy.deepcopy(config)
        followers.train.fresh, followers.train.resume_from = False, None  # rank 0 already moved or adopted files
        with contextlib.redirect_stdout(io.StringIO()):
            restore_or_start(state, followers, out_dir)
