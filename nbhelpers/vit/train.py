"""`fit(config)`: train a ViT on CIFAR-10 with the data and augmentation on the device, resumably.

The loop never synchronises with the host except every `log_every` steps (progress bar, NaN check)
and at epoch ends (evaluation, checkpoint).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    torch.manual_seed(config.train.seed)
    model = VisionTransformer(config.model).to(runtime.device)
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, config, runtime)
    train = config.train
    total, warmup = train.epochs * steps_per_epoch, round(train.warmup_epochs * steps_per_epoch)
    schedule = lambda step: lr_at(step, total, warmup, train.lr, train.min_lr) / train.lr  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.use_grad_scaler)
    return TrainState(model, ema, optimizer, scheduler, scaler)


# ----------------------------------------------------------------------------- training loop


def check_batch_size(config: Config, data: DataSplits) -> None:
    count = len(data.train_images)
    if config.train.batch_size > count:
        raise ValueError(f"BATCH_SIZE={config.train.batch_size} is larger than the {count} training images. Set BATCH_SIZE <= {count}.")


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
    network = torch.compile(state.model) if runtime.compile else state.model
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
            state.ema.update(state.model)
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


def stop_if_asked(state: TrainState, config: Config, out_dir: Path, signals: StopSignals | None, save: bool = True) -> None:
    """When a SIGINT/SIGTERM arrived: save last.pt at this step boundary (unless just saved) and raise StopRequested."""
    if signals is None or not signals.requested:
        return
    if save:
        save_last(state, config, out_dir)
    message = f"stopped at step {state.step}; run again to resume"
    print(message, flush=True)
    raise StopRequested(message, signals.received)


def account_time(state: TrainState, since: float) -> float:
    """Add the training time since `since` to the state's totals; return now."""
    now = time.perf_counter()
    state.train_seconds += now - since
    state.wall_seconds += now - since
    return now


def train_one_epoch(state: TrainState, train_step, config: Config, tensors: dict[str, torch.Tensor], out_dir: Path, bar: tqdm,
                    signals: StopSignals | None = None, on_first_window=None) -> dict[str, Any]:
    """Finish the epoch `state.step` is in; return its training record (loss, accuracy, speed).

    Args:
        signals: checked after every step; a stop request saves last.pt and raises StopRequested.
        on_first_window: called once with the seconds per step of the first logging window (time estimate).
    """
    train = config.train
    count = len(tensors["train_labels"])
    steps_per_epoch = count // train.batch_size
    epoch, offset = divmod(state.step, steps_per_epoch)
    order = epoch_order(train.seed, epoch, count, tensors["train_labels"].device)
    mix = epoch < train.epochs - config.augment.mix_off_epochs
    loss_sum = torch.zeros((), device=order.device)
    correct_sum = torch.zeros((), device=order.device, dtype=torch.long)
    window_start, window_steps, epoch_start, last_save = time.perf_counter(), 0, time.perf_counter(), time.monotonic()
    accounted = epoch_start
    for index in range(offset, steps_per_epoch):
        batch = order[index * train.batch_size:(index + 1) * train.batch_size]
        loss, correct = train_step(tensors["train_images"][batch], tensors["train_labels"][batch], mix)
        loss_sum += loss
        correct_sum += correct
        state.step, window_steps = state.step + 1, window_steps + 1
        if signals is not None and signals.requested and index < steps_per_epoch - 1:  # an epoch's last step: see run_epochs
            account_time(state, accounted)
            stop_if_asked(state, config, out_dir, signals)
        if window_steps == train.log_every or index == steps_per_epoch - 1:
            check_finite(loss_sum, state, out_dir, config)  # the one host sync per logging window
            done = index + 1 - offset
            window_seconds = time.perf_counter() - window_start
            speed = window_steps * train.batch_size / window_seconds
            if on_first_window is not None:
                on_first_window(window_seconds / window_steps)
                on_first_window = None
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum.item() / done:.3f}", acc=f"{correct_sum.item() / (done * train.batch_size):.3f}",
                            img_s=f"{speed:,.0f}", lr=f"{state.scheduler.get_last_lr()[0]:.2e}")
            bar.update(window_steps)
            window_start, window_steps = time.perf_counter(), 0
            if time.monotonic() - last_save > train.checkpoint_minutes * 60 and index < steps_per_epoch - 1:
                accounted = account_time(state, accounted)  # a resumed run keeps the time spent so far
                save_last(state, config, out_dir)  # wall-clock checkpoint inside long epochs
                last_save = time.monotonic()
    account_time(state, accounted)
    seconds, done = time.perf_counter() - epoch_start, steps_per_epoch - offset
    return {"epoch": epoch + 1, "step": state.step, "train_loss": loss_sum.item() / done,
            "train_accuracy": correct_sum.item() / (done * train.batch_size), "lr": state.scheduler.get_last_lr()[0],
            "images_per_second": done * train.batch_size / seconds, "epoch_seconds": seconds, "mix": mix,
            "steps": done}  # fewer than an epoch's when the run resumed mid-epoch


def run_epochs(state: TrainState, config: Config, runtime: Runtime, tensors: dict[str, torch.Tensor], out_dir: Path,
               signals: StopSignals | None = None) -> bool:
    """Train from `state.step` to the end (or `stop_after_epochs`); return True when training is complete."""
    total_steps = config.train.epochs * (len(tensors["train_labels"]) // config.train.batch_size)
    with tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True) as bar:  # closed on errors too
        return train_epochs(state, config, runtime, tensors, out_dir, signals, bar)


def train_epochs(state: TrainState, config: Config, runtime: Runtime, tensors: dict[str, torch.Tensor], out_dir: Path,
                 signals: StopSignals | None, bar: tqdm) -> bool:
    """The epoch loop of `run_epochs`: train, evaluate, checkpoint; print the time estimate after the first window."""
    train = config.train
    total_steps = bar.total
    train_step = make_train_step(state, GpuAugment(config.augment, config.model.num_classes), runtime, config)
    first_step = state.step
    estimate = lambda seconds: tqdm.write(announce_estimate(total_steps - first_step, seconds, runtime))  # noqa: E731
    epochs_this_call = 0
    state.model.train()
    while state.step < total_steps:
        record = train_one_epoch(state, train_step, config, tensors, out_dir, bar, signals, estimate if state.step == first_step else None)
        evaluation_start = time.perf_counter()
        record.update(evaluate_epoch(state, tensors, runtime, config))
        state.wall_seconds += time.perf_counter() - evaluation_start
        state.history.append(record)
        tqdm.write(format_epoch(record, train.epochs))
        if "val_accuracy" in record and record.get("ema_val_accuracy", record["val_accuracy"]) > state.best_val_accuracy:
            state.best_val_accuracy = record.get("ema_val_accuracy", record["val_accuracy"])
            save_best(state, config, out_dir, record["epoch"])
        save_last(state, config, out_dir)
        stop_if_asked(state, config, out_dir, signals, save=False)
        epochs_this_call += 1
        if train.stop_after_epochs is not None and epochs_this_call >= train.stop_after_epochs and state.step < total_steps:
            bar.close()
            print(f"Stopped after {epochs_this_call} epoch(s) as asked (STOP_AFTER_EPOCHS); run again with the same OUT_DIR to resume.")
            return False
    return True


def fit(config: Config) -> FitResult:
    """Train (or resume) the configured ViT, evaluate it and write the report files.

    OUT_DIR is locked for the run (a second run into it is refused). SIGINT / SIGTERM save last.pt at the next
    step and raise StopRequested (a KeyboardInterrupt; the CLI exits 130 / 143).

    Args:
        config: from `build_config(preset, **overrides)`.
    Returns:
        FitResult; `summary` is what run_summary.json holds once training finished.
    """
    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    out_dir = ensure_writable_dir(paths.out_dir, "OUT_DIR")
    with RunLock(out_dir), StopSignals() as signals:
        removed = remove_stale_temp_files(out_dir) + (remove_stale_temp_files(out_dir / "cache") if (out_dir / "cache").is_dir() else [])
        if removed:
            print(f"Removed {len(removed)} temp file(s) left by an interrupted run: {', '.join(path.name for path in removed)}")
        return fit_locked(config, paths.data_root, out_dir, signals)


def fit_locked(config: Config, data_root: Path, out_dir: Path, signals: StopSignals | None = None) -> FitResult:
    """`fit` once OUT_DIR is locked: data, state, training, report."""
    runtime = select_runtime(config.train.device, config.train.precision, config.train.compile)
    data = load_data(config.train, data_root, out_dir / "cache")
    check_batch_size(config, data)
    check_class_count(config, data)
    print(f"data: {data.source} | train {len(data.train_labels)} val {len(data.val_labels)} test {len(data.test_labels)} | out: {out_dir}")
    steps_per_epoch = len(data.train_labels) // config.train.batch_size
    state = build_state(config, runtime, steps_per_epoch)
    restore_or_start(state, config, out_dir)
    check_space_for_checkpoints(state, config, out_dir)
    tensors = to_device(data, runtime.device)
    if not run_epochs(state, config, runtime, tensors, out_dir, signals):
        return FitResult(config, out_dir, "stopped", state.step, state.history, {})
    if len(data.val_labels) == 0:  # no validation split: best.pt is the final state, the same bytes as last.pt
        link_or_copy(out_dir / "last.pt", out_dir / "best.pt")
    elif not (out_dir / "best.pt").exists():
        save_best(state, config, out_dir, len(state.history))
    return report.finish(state, config, runtime, data, tensors, out_dir)
