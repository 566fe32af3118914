"""`fit(config)`: train a ViT on CIFAR-10 with the data and augmentation on the device, resumably.

The loop never synchronises with the host except every `log_every` steps (progress bar, NaN check)
and at epoch ends (evaluation, checkpoint).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nbhelpers import distributed
from nbhelpers.platform import (
    RunLock, Runtime, StopRequested, StopSignals, ensure_writable_dir, remove_stale_temp_files, resolve_paths, select_runtime,
)
from nbhelpers.vit import report
from nbhelpers.vit.augment import GpuAugment
from nbhelpers.vit.checkpoint import (
    check_space_for_checkpoints, divergence_error, link_or_copy, restore_or_start, save_best, save_last,
)
from nbhelpers.vit.config import Config
from nbhelpers.vit.data import DataSplits, load_data
from nbhelpers.vit.evaluate import evaluate_epoch, format_epoch, to_device
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.pacing import LoopClock, auto_eval_every, evaluation_epochs, plan_budget
from nbhelpers.vit.state import FitResult, ModelEma, TrainState

# ----------------------------------------------------------------------------- schedule + EMA


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to `min_lr` at the last step.

    Args:
        step: 0-based optimizer step about to be taken.
    Returns:
        The learning rate for that step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: VisionTransformer, config: Config, runtime: Runtime) -> torch.optim.AdamW:
    """AdamW with no weight decay on norms, biases, positions and tokens; fused on CUDA."""
    skip = model.no_weight_decay()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and n not in skip]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n in skip]
    train = config.train
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, eps=train.eps, fused=runtime.is_cuda)


def build_state(config: Config, runtime: Runtime, steps_per_epoch: int) -> TrainState:
    """Model, EMA, optimizer and a cosine schedule whose length is `state.total_steps` (the budget may change it)."""
    torch.manual_seed(config.train.seed)
    model = VisionTransformer(config.model).to(runtime.device)
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, config, runtime)
    train = config.train
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    state = TrainState(model, ema, optimizer, None, scaler, total_steps=train.epochs * steps_per_epoch,
                       warmup_steps=round(train.warmup_epochs * steps_per_epoch))
    schedule = lambda step: lr_at(step, state.total_steps, state.warmup_steps, train.lr, train.min_lr) / train.lr  # noqa: E731
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return state


# ----------------------------------------------------------------------------- training loop


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


def make_train_step(state: TrainState, augment: GpuAugment, runtime: Runtime, config: Config):
    """The step on this rank's slice of a global batch; DDP averages the gradients over the ranks."""
    network = distributed.wrap_model(state.model)
    network = torch.compile(network) if runtime.compile else network
    parameters = [p for p in state.model.parameters() if p.requires_grad]

    def train_step(images: torch.Tensor, labels: torch.Tensor, mix: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = augment(images, labels, mix=mix)  # (B, 3, H, W) float, (B, C) soft targets
        with runtime.autocast():
            logits = network(inputs)
        loss = F.cross_entropy(logits.float(), targets)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if config.train.grad_clip > 0:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.model, state.step)
        correct = (logits.argmax(-1) == targets.argmax(-1)).sum()
        return loss.detach(), correct

    return train_step


def check_finite(loss_sum: torch.Tensor, state: TrainState, out_dir: Path, config: Config) -> None:
    """Stop on a non-finite loss or weights: the loss is computed before each update, so the weights are checked too."""
    if not torch.isfinite(loss_sum).item():
        raise divergence_error(state, config, out_dir, f"Training loss became {loss_sum.item()}")
    if not state.weights_are_finite():
        raise divergence_error(state, config, out_dir, "The weights became NaN or infinite")


LONG_RUN_SECONDS = 3 * 3600  # estimates above this get a hint towards a quick check or a GPU


def announce_estimate(remaining_steps: int, seconds_per_step: float, runtime: Runtime) -> str:
    """One line: the estimated training time left on this device, with a hint when it is long (never a refusal)."""
    seconds = remaining_steps * seconds_per_step
    duration = f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    text = f"estimated training time on this device: {duration} ({remaining_steps:,} steps at {seconds_per_step:.3g} s/step)"
    if seconds > LONG_RUN_SECONDS:
        text += (". That is long: PRESET=\"smoke\" checks the whole notebook in a minute" +
                 ("." if runtime.is_cuda else ", and a GPU platform (Kaggle or Colab with a GPU) trains it in far less."))
    return text


def stop_requested(signals: StopSignals | None, device: torch.device, at_window: bool) -> bool:
    """A SIGINT/SIGTERM arrived. Under torchrun the ranks agree at logging windows, so they stop at the same step."""
    if signals is None:
        return False
    if distributed.world_size() == 1:
        return signals.requested
    if not at_window:
        return False
    return distributed.all_reduce_sum(torch.tensor([float(signals.requested)], device=device)).item() > 0


def stop_now(state: TrainState, config: Config, out_dir: Path, signals: StopSignals, save: bool = True) -> None:
    """Save last.pt at this step boundary (rank 0, unless just saved), say so and raise StopRequested."""
    if save and distributed.is_main():
        save_last(state, config, out_dir)
    message = f"stopped at step {state.step}; run again to resume"
    if distributed.is_main():
        print(message, flush=True)
    raise StopRequested(message, signals.received or 15)


def account_time(state: TrainState, since: float) -> float:
    """Add the training time since `since` to the state's totals; return now."""
    now = time.perf_counter()
    state.train_seconds += now - since
    state.wall_seconds += now - since
    return now


def save_checkpoint(state: TrainState, config: Config, out_dir: Path, clock: LoopClock) -> None:
    """last.pt from rank 0 (the other ranks hold the same state), timed for the budget and the overhead figures."""
    if distributed.is_main():
        start = time.monotonic()
        save_last(state, config, out_dir)
        clock.checkpoint_seconds = time.monotonic() - start
    clock.last_save = time.monotonic()


def epoch_record(state: TrainState, sums: torch.Tensor, done: int, batch_size: int, seconds: float) -> dict[str, Any]:
    """The epoch's training loss and accuracy over all ranks (`sums` = this rank's [loss sum, correct])."""
    loss_sum, correct = distributed.all_reduce_sum(sums.clone()).tolist()
    return {"step": state.step, "train_loss": loss_sum / (done * distributed.world_size()),
            "train_accuracy": correct / (done * batch_size), "lr": state.scheduler.get_last_lr()[0],
            "images_per_second": done * batch_size / seconds, "epoch_seconds": seconds}


def train_one_epoch(state: TrainState, train_step, config: Config, tensors: dict[str, torch.Tensor], out_dir: Path, bar: tqdm,
                    clock: LoopClock | None = None, signals: StopSignals | None = None, on_first_window=None) -> dict[str, Any]:
    """Finish the epoch `state.step` is in (or stop at `state.total_steps`); return its training record.

    Args:
        signals: a stop request saves last.pt at the next step boundary and raises StopRequested.
        on_first_window: called once with the seconds per step of the first logging window (time estimate).
    """
    train, clock = config.train, clock or LoopClock()
    count = len(tensors["train_labels"])
    steps_per_epoch = count // train.batch_size
    epoch, offset = divmod(state.step, steps_per_epoch)
    end = min(steps_per_epoch, state.total_steps - epoch * steps_per_epoch)
    order = epoch_order(train.seed, epoch, count, tensors["train_labels"].device)
    mix = epoch < math.ceil(state.total_steps / steps_per_epoch) - config.augment.mix_off_epochs
    sums = torch.zeros(2, device=order.device)  # [loss sum, correct predictions] of this rank
    window_start, window_steps, epoch_start = time.perf_counter(), 0, time.perf_counter()
    accounted, steady = epoch_start, [0.0, 0]  # steady: seconds and steps after this call's first window
    for index in range(offset, end):
        batch = distributed.shard(order[index * train.batch_size:(index + 1) * train.batch_size])
        loss, correct = train_step(tensors["train_images"][batch], tensors["train_labels"][batch], mix)
        sums[0] += loss
        sums[1] += correct
        state.step, window_steps = state.step + 1, window_steps + 1
        at_window = window_steps == train.log_every or index == end - 1
        if index < end - 1 and stop_requested(signals, order.device, at_window):  # an epoch's last step: see run_epochs
            account_time(state, accounted)
            stop_now(state, config, out_dir, signals)
        if at_window:
            check_finite(distributed.all_reduce_sum(sums[:1].clone()), state, out_dir, config)  # the one host sync per window
            now = time.perf_counter()
            if on_first_window is not None:
                on_first_window((now - window_start) / window_steps)
                on_first_window = None
            if index + 1 - offset > window_steps:  # not the first window: compile and warm-up are behind us
                steady = [steady[0] + now - window_start, steady[1] + window_steps]
            show_progress(bar, state, epoch, sums, index + 1 - offset, train.batch_size, window_steps / (now - window_start))
            window_start, window_steps = time.perf_counter(), 0
            if index < end - 1 and clock.checkpoint_due(train.checkpoint_minutes):
                accounted = account_time(state, accounted)  # a resumed run keeps the time spent so far
                save_checkpoint(state, config, out_dir, clock)  # wall-clock checkpoint inside long epochs
    account_time(state, accounted)
    done = end - offset
    record = epoch_record(state, sums, done, train.batch_size, time.perf_counter() - epoch_start)
    # steady-state speed; an epoch of one logging window has only its whole time (compile included) to go by
    clock.step_seconds = steady[0] / steady[1] if steady[1] else record["epoch_seconds"] / max(1, done)
    return {"epoch": epoch + 1, **record, "mix": mix, "steps": done}  # fewer steps than an epoch's after a mid-epoch resume


def show_progress(bar: tqdm, state: TrainState, epoch: int, sums: torch.Tensor, done: int, batch_size: int, steps_per_second: float) -> None:
    """Progress bar update (rank 0's slice of the batch; the epoch record holds all ranks')."""
    local_batch = batch_size // distributed.world_size()
    bar.set_postfix(epoch=epoch + 1, loss=f"{sums[0].item() / done:.3f}", acc=f"{sums[1].item() / (done * local_batch):.3f}",
                    img_s=f"{steps_per_second * batch_size:,.0f}", lr=f"{state.scheduler.get_last_lr()[0]:.2e}")
    bar.update(state.step - bar.n)


def plan_time_budget(state: TrainState, config: Config, clock: LoopClock, steps_per_epoch: int, bar: tqdm) -> None:
    """After the first epoch of a budgeted run: fix the schedule's length from measured speed (rank 0 decides)."""
    train = config.train
    plan = plan_budget(train.time_budget_minutes * 60, clock, state.step, steps_per_epoch, train.checkpoint_minutes, train.eval_final_epochs)
    plan = distributed.broadcast_from_main(plan)
    state.budget_plan, state.total_steps = plan, plan["total_steps"]
    state.warmup_steps = min(state.warmup_steps, state.total_steps // 4)
    bar.total = state.total_steps
    bar.refresh()
    epochs = state.total_steps / steps_per_epoch
    if distributed.is_main():
        tqdm.write(f"TIME_BUDGET_MINUTES={train.time_budget_minutes}: {plan['steps_per_second']:.2f} steps/s measured "
                   f"-> {state.total_steps} steps ({epochs:.1f} epochs; EPOCHS={train.epochs} is ignored).")


def evaluate_if_scheduled(state: TrainState, record: dict[str, Any], config: Config, context: dict[str, Any]) -> None:
    """Evaluate on the schedule of `pacing.evaluation_epochs`; keep best.pt; time it for the schedule itself."""
    train, clock = config.train, context["clock"]
    epochs = math.ceil(state.total_steps / context["steps_per_epoch"])
    if not train.eval_every and clock.eval_seconds and clock.epoch_seconds:
        context["eval_every"] = distributed.broadcast_from_main(
            auto_eval_every(epochs, train.eval_final_epochs, clock.eval_seconds[-1], max(clock.epoch_seconds)))
    if record["epoch"] not in evaluation_epochs(epochs, train.eval_every or context["eval_every"], train.eval_final_epochs):
        return
    start = time.perf_counter()
    record.update(evaluate_epoch(state, context["tensors"], context["runtime"], config, context["eval_models"]))
    clock.eval_seconds.append(time.perf_counter() - start)
    state.wall_seconds += clock.eval_seconds[-1]
    score = record.get("ema_val_accuracy", record.get("val_accuracy", -1.0))
    if "val_accuracy" in record and score > state.best_val_accuracy:
        state.best_val_accuracy = score
        if distributed.is_main():
            save_best(state, config, context["out_dir"], record["epoch"])


def run_epochs(state: TrainState, config: Config, runtime: Runtime, tensors: dict[str, torch.Tensor], out_dir: Path,
               clock: LoopClock | None = None, signals: StopSignals | None = None) -> bool:
    """Train from `state.step` to `state.total_steps` (or `stop_after_epochs`); return True when training is complete."""
    bar = tqdm(total=state.total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True, disable=not distributed.is_main())
    with bar:  # closed on errors too
        return train_epochs(state, config, runtime, tensors, out_dir, clock or LoopClock(), signals, bar)


def train_epochs(state: TrainState, config: Config, runtime: Runtime, tensors: dict[str, torch.Tensor], out_dir: Path,
                 clock: LoopClock, signals: StopSignals | None, bar: tqdm) -> bool:
    """The epoch loop of `run_epochs`: train, evaluate on schedule, checkpoint; the time estimate after the first window."""
    train = config.train
    steps_per_epoch = len(tensors["train_labels"]) // train.batch_size
    if distributed.rank() > 0:  # rank 0 keeps the (restored) stream; the others draw their own augmentation
        torch.manual_seed(distributed.augmentation_seed(train.seed, state.step))
    train_step = make_train_step(state, GpuAugment(config.augment, config.model.num_classes), runtime, config)
    context = {"clock": clock, "steps_per_epoch": steps_per_epoch, "tensors": tensors, "runtime": runtime, "out_dir": out_dir,
               "eval_models": compiled_for_evaluation(state, runtime), "eval_every": 1}
    first_step, epochs_this_call = state.step, 0
    estimate = lambda seconds: distributed.is_main() and tqdm.write(announce_estimate(state.total_steps - first_step, seconds, runtime))  # noqa: E731
    state.model.train()
    while state.step < state.total_steps:
        full_epoch = state.step % steps_per_epoch == 0
        record = train_one_epoch(state, train_step, config, tensors, out_dir, bar, clock, signals,
                                 estimate if state.step == first_step else None)
        if full_epoch and record["steps"] == steps_per_epoch:
            clock.epoch_seconds.append(record["epoch_seconds"])
        if train.time_budget_minutes and state.budget_plan is None:
            save_checkpoint(state, config, out_dir, clock)  # measures the checkpoint's cost for the plan
        evaluate_if_scheduled(state, record, config, context)
        state.history.append(record)
        if train.time_budget_minutes and state.budget_plan is None:
            plan_time_budget(state, config, clock, steps_per_epoch, bar)
        if distributed.is_main():
            tqdm.write(format_epoch(record, math.ceil(state.total_steps / steps_per_epoch)))
        epochs_this_call += 1
        finished = state.step >= state.total_steps
        stopping = train.stop_after_epochs is not None and epochs_this_call >= train.stop_after_epochs and not finished
        saving = finished or stopping or clock.checkpoint_due(train.checkpoint_minutes)
        if saving:
            save_checkpoint(state, config, out_dir, clock)
        if not finished and stop_requested(signals, tensors["train_labels"].device, at_window=True):
            stop_now(state, config, out_dir, signals, save=not saving)
        if stopping:
            if distributed.is_main():
                print(f"Stopped after {epochs_this_call} epoch(s) as asked (STOP_AFTER_EPOCHS); run again with the same OUT_DIR to resume.")
            return False
    return True


def compiled_for_evaluation(state: TrainState, runtime: Runtime) -> dict[str, torch.nn.Module]:
    """The raw and EMA networks used by per-epoch evaluation, compiled when training is (same weights, no copy)."""
    models = {"raw": state.model} | ({"ema": state.ema.module} if state.ema is not None else {})
    return {name: torch.compile(model) if runtime.compile else model for name, model in models.items()}


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
    device = distributed.init_from_env(config.train.device)
    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    if not distributed.is_main():
        with StopSignals() as signals:
            return fit_locked(config, device, paths.data_root, paths.out_dir, signals)
    out_dir = ensure_writable_dir(paths.out_dir, "OUT_DIR")
    with RunLock(out_dir), StopSignals() as signals:
        removed = remove_stale_temp_files(out_dir) + (remove_stale_temp_files(out_dir / "cache") if (out_dir / "cache").is_dir() else [])
        if removed:
            print(f"Removed {len(removed)} temp file(s) left by an interrupted run: {', '.join(path.name for path in removed)}")
        return fit_locked(config, device, paths.data_root, out_dir, signals)


def fit_locked(config: Config, device: str | None, data_root: Path, out_dir: Path, signals: StopSignals | None = None) -> FitResult:
    """`fit` once OUT_DIR is locked: data, state, training, report."""
    clock = LoopClock()
    runtime = select_runtime(device, config.train.precision, config.train.compile, verbose=distributed.is_main())
    data = load_data_rank_by_rank(config, data_root, out_dir)
    check_batch_size(config, data)
    check_class_count(config, data)
    if distributed.is_main():
        print(f"data: {data.source} | train {len(data.train_labels)} val {len(data.val_labels)} test {len(data.test_labels)} | "
              f"out: {out_dir} | processes: {distributed.world_size()}")
    steps_per_epoch = len(data.train_labels) // config.train.batch_size
    state = build_state(config, runtime, steps_per_epoch)
    restore_rank_by_rank(state, config, out_dir)
    if distributed.is_main():
        check_space_for_checkpoints(state, config, out_dir)
    tensors = to_device(data, runtime.device)
    if not run_epochs(state, config, runtime, tensors, out_dir, clock, signals):
        return FitResult(config, out_dir, "stopped", state.step, state.history, {})
    devices = distributed.gather_objects(runtime.description)
    if not distributed.is_main():
        return FitResult(config, out_dir, "finished", state.step, state.history, {})
    if len(data.val_labels) == 0:  # no validation split: best.pt is the final state, the same bytes as last.pt
        link_or_copy(out_dir / "last.pt", out_dir / "best.pt")
    elif not (out_dir / "best.pt").exists():
        save_best(state, config, out_dir, len(state.history))
    run = {"world_size": distributed.world_size(), "devices": devices, "started_monotonic": clock.started}
    return report.finish(state, config, runtime, data, tensors, out_dir, run)


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
