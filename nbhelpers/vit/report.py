"""Final evaluation, run_summary.json, and the plots: curves, confusion matrix, mistakes, attention.

Accuracy reported as *the* result is the final epoch's test accuracy. The best epoch's test accuracy
is also recorded, labelled as chosen on the test set, only to compare with write-ups that report it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import platform as python_platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbhelpers.platform import Runtime, atomic_write
from nbhelpers.vit.config import PRESETS, Config, ModelConfig
from nbhelpers.vit.data import DataSplits
from nbhelpers.vit.augment import normalize
from nbhelpers.vit.evaluate import DeviceData, evaluate
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.state import REPORT_PLOTS, FitResult, TrainState

# ----------------------------------------------------------------------------- measurements


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: torch.nn.Module, image_size: int) -> int:
    """Forward FLOPs for one image, counted by torch's FlopCounterMode (a multiply-add = 2 FLOPs).

    Attention runs on SDPA's math backend while counting: FlopCounterMode has no count for the CPU's fused
    kernel (it would report attention as 0 FLOPs there), and the math backend's matmuls count the same on every device.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


@dataclass
class LayerRow:
    """One line of the model table: a named part, the shape it outputs for one image, its parameters and FLOPs."""

    name: str
    what: str
    output_shape: tuple[int, ...]
    parameters: int
    flops: int


@dataclass
class ModelTable:
    """The per-layer table of `model_table`; totals are the whole model's (not a sum of rounded rows)."""

    rows: list[LayerRow]
    total_parameters: int
    total_flops: int
    tokens: int

    def to_markdown(self) -> str:
        lines = ["| layer | what it does | output shape (one image) | parameters | forward FLOPs |", "| --- | --- | --- | ---: | ---: |"]
        lines += [f"| {row.name} | {row.what} | {tuple(row.output_shape)} | {row.parameters:,} | {row.flops / 1e6:,.2f} M |" for row in self.rows]
        lines.append(f"| **total** | {self.tokens} tokens | | **{self.total_parameters:,}** | **{self.total_flops / 1e6:,.1f} M** |")
        return "\n".join(lines)


def _layer_descriptions(model: VisionTransformer) -> list[tuple[str, str, torch.nn.Module]]:
    """(row name, description, module whose output the row shows) in forward order."""
    config = model.config
    tokenizer = {"patch": f"{config.patch_size}x{config.patch_size} patches -> Linear (a strided Conv2d)",
                 "spt": f"image + 4 half-patch shifts, {config.patch_size}x{config.patch_size} patches, LayerNorm, Linear",
                 "conv": f"{config.conv_layers} x (Conv3x3, ReLU, MaxPool)"}[config.tokenizer]
    attention = "LSA" if config.lsa else "attention"
    extras = ", ".join(name for name, on in (("LayerScale", bool(config.layerscale)), ("DropPath", config.drop_path > 0)) if on)
    rows = [("tokenizer", tokenizer, model.tokenizer)]
    rows += [(f"block {index + 1}", f"pre-norm {attention} + MLP {config.dim}->{config.mlp_dim}->{config.dim}" + (f" ({extras})" if extras else ""), block)
             for index, block in enumerate(model.blocks)]
    rows.append(("final norm", "LayerNorm", model.norm))
    rows.append(("head", f"Linear {config.dim} -> {config.num_classes} class scores", model.head))
    return rows


def model_table(model: VisionTransformer) -> ModelTable:
    """Each layer's output shape (forward hooks), parameters and forward FLOPs (FlopCounterMode) for one image.

    Args:
        model: any VisionTransformer (it is run once on a zero image, in eval mode, without gradients).
    Returns:
        ModelTable; rows in forward order, with the class token + positions and the pooling step as their own rows.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    parts = _layer_descriptions(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, _, module in parts]
    hooks.append(model.head.register_forward_pre_hook(lambda _m, inputs: shapes.__setitem__("pool", tuple(inputs[0].shape))))
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    size = model.config.image_size
    try:  # the math attention backend: FlopCounterMode has no count for the CPU's fused kernel
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    flops = {name.removeprefix("VisionTransformer."): sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    names = {module: name for name, module in model.named_modules()}
    rows = [LayerRow(name, what, shapes[name], count_parameters(module), flops.get(names[module], 0)) for name, what, module in parts]
    prefix = [p for p in (model.cls_token, model.pos_embed) if isinstance(p, torch.nn.Parameter)]
    token_shape = (1, model.num_tokens, model.config.dim)
    pool_what = {"cls": "the class token's output", "mean": "mean over tokens", "seqpool": "attention-weighted mean (sequence pooling)"}[model.config.pool]
    rows.insert(1, LayerRow("class token + positions", "prepend [CLS], add a learned position per token" if model.cls_token is not None
                            else "add a position per token", token_shape, sum(p.numel() for p in prefix), 0))
    pool_parameters = count_parameters(model.pool_score) if model.pool_score is not None else 0
    # Pooling runs in the model's own forward (sequence pooling: a score layer and a weighted sum): what the
    # named parts do not account for is its share.
    total = int(counter.get_total_flops())
    rows.insert(len(rows) - 1, LayerRow("pool", pool_what, shapes["pool"], pool_parameters, total - sum(row.flops for row in rows)))
    return ModelTable(rows, count_parameters(model), total, model.num_tokens)


def parameters_of(model: ModelConfig) -> int:
    """Parameter count of the model a ModelConfig builds, without allocating a deep one: blocks are identical,
    so a one-block model plus (depth - 1) blocks gives the exact count."""
    one_block = VisionTransformer(dataclasses.replace(model, depth=1, drop_path=0.0))
    return count_parameters(one_block) + (model.depth - 1) * count_parameters(one_block.blocks[0])


def patch_grid_figure(image: np.ndarray, config: ModelConfig, show: bool = True, path: Path | None = None):
    """The sample image cut into the model's tokens: patch grid lines (SPT: also its four half-patch shifts).

    Args:
        image: (H, W, 3) uint8 of the model's image size.
        path: where to save the PNG (None = not saved).
    Returns:
        The matplotlib figure (closed after display when `show`).
    """
    import matplotlib.pyplot as plt

    side = config.image_size
    spt = config.tokenizer == "spt"
    shifts = [(0, 0)] + ([(1, 1), (-1, 1), (1, -1), (-1, -1)] if spt else [])
    figure, axes = plt.subplots(1, len(shifts), figsize=(3.2 * len(shifts), 3.4), squeeze=False)
    half = config.patch_size // 2
    for axis, (dx, dy) in zip(axes[0], shifts):
        shifted = np.roll(image, (dy * half, dx * half), axis=(0, 1)) if (dx or dy) else image
        axis.imshow(shifted)
        if config.tokenizer != "conv":
            for line in np.arange(-0.5, side, config.patch_size):
                axis.axhline(line, color="white", linewidth=0.8)
                axis.axvline(line, color="white", linewidth=0.8)
        axis.set_title("image" if not (dx or dy) else f"shifted ({dx * half:+d}, {dy * half:+d}) px", fontsize=9)
        axis.axis("off")
    grid = side // config.patch_size
    caption = (f"{grid}x{grid} = {grid * grid} patches of {config.patch_size}x{config.patch_size} px, each one token"
               if config.tokenizer != "conv" else "the conv tokenizer has no patch grid")
    figure.suptitle(caption + (" (SPT stacks the image with 4 shifted copies before cutting)" if spt else ""), fontsize=10)
    if path is not None:
        return finish_figure(figure, path, show)
    if show:
        _display(figure)
    return figure


def sample_image(config: Config, index: int = 0) -> tuple[np.ndarray, str]:
    """Test image `index` of the configured data set and its class name (loaded, and cached, as `fit` will)."""
    from nbhelpers.platform import resolve_paths
    from nbhelpers.vit.data import load_data

    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    data = load_data(config.train, paths.data_root, paths.out_dir / "cache")
    return data.test_images[index], data.classes[int(data.test_labels[index])]


def show_model(config: Config) -> ModelTable:
    """Notebook cell: the per-layer table of the configured model and its patch grid over a test image."""
    from IPython.display import Markdown, display

    torch.manual_seed(config.train.seed)
    table = model_table(VisionTransformer(config.model))
    display(Markdown(table.to_markdown()))
    image, label = sample_image(config)
    figure = patch_grid_figure(image, config.model, show=False)
    figure.axes[0].set_title(f"a test image ({label})", fontsize=9)
    _display(figure)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return table


# ----------------------------------------------------------------------------- presets and configuration

MEASUREMENTS = Path(__file__).resolve().parents[2] / "benchmarks" / "preset_epoch_times.json"


def record_epoch_time(summary_path: str | Path, measurements_path: str | Path = MEASUREMENTS, note: str = "") -> dict[str, Any]:
    """Add a finished run's median seconds per full epoch to the measurements file (written atomically).

    Args:
        summary_path: the run's run_summary.json.
        note: e.g. "quiet machine" or the command that ran it.
    Returns:
        The measurement added: preset, seconds_per_epoch, device, date, data, note.
    """
    summary = json.loads(Path(summary_path).read_text())
    full = summary["train_images"] // summary["config"]["train"]["batch_size"]  # a resumed epoch's part is not timed whole
    seconds = [record["epoch_seconds"] for record in summary["history"] if record.get("steps") == full and "epoch_seconds" in record]
    if not seconds:
        raise ValueError(f"{summary_path} has no timed epochs; record a finished run's run_summary.json.")
    entry = {"preset": summary["preset"], "seconds_per_epoch": float(np.median(seconds)), "device": summary["device"],
             "date": datetime.datetime.fromtimestamp(Path(summary_path).stat().st_mtime).strftime("%Y-%m-%d"),
             "data": summary["data_source"], "train_images": summary["train_images"], "note": note}
    path = Path(measurements_path)
    content = json.loads(path.read_text()) if path.is_file() else {"measurements": []}
    content["measurements"].append(entry)
    write_json_atomic(content, path)
    return entry




def load_measurements(path: str | Path) -> list[dict[str, Any]]:
    """Measured seconds per epoch from a JSON file ({"measurements": [{preset, seconds_per_epoch, device, date, ...}]}).

    A missing file means nothing is measured yet (an empty list).
    """
    path = Path(path)
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("measurements", []))


def _measured_epoch(preset: str, measurements: list[dict[str, Any]]) -> str:
    found = [m for m in measurements if m.get("preset") == preset and m.get("seconds_per_epoch")]
    if not found:
        return "not measured"
    latest = max(found, key=lambda m: str(m.get("date", "")))
    seconds = float(latest["seconds_per_epoch"])
    shown = f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return f"{shown} ({latest.get('device', 'device not recorded')}, {latest.get('date', 'undated')})"


def presets_table(measurements_path: str | Path | None = MEASUREMENTS) -> str:
    """Markdown table of every registered preset: model, epochs, batch, LR, parameters and measured time per epoch.

    Args:
        measurements_path: JSON of measured epoch times (see `load_measurements`); None = none measured.
    """
    measurements = load_measurements(measurements_path) if measurements_path else []
    lines = ["| preset | what it is for | model | epochs | batch | peak LR | parameters | time per epoch (measured) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for name, factory in PRESETS.items():
        config = factory()
        model, train = config.model, config.train
        tokens = f"patch {model.patch_size}" + (", SPT" if model.tokenizer == "spt" else "") if model.tokenizer != "conv" else "conv stem"
        shape = f"{model.dim} wide x {model.depth} deep, {model.heads} heads, {tokens}" + (", LSA" if model.lsa else "")
        purpose = (factory.__doc__ or "").strip().split(":")[0].split(".")[0]
        lines.append(f"| `{name}` | {purpose} | {shape} | {train.epochs} | {train.batch_size} | {train.lr:g} | "
                     f"{parameters_of(model) / 1e6:.2f} M | {_measured_epoch(name, measurements)} |")
    return "\n".join(lines)


def config_table(config: Config, columns: int = 3) -> str:
    """The configuration as a compact Markdown table: `columns` (name, value) pairs per row, one section after another."""
    header = "| " + " | ".join(["setting", "value"] * columns) + " |"
    lines = [f"Preset `{config.preset}`.", "", header, "|" + " --- |" * (2 * columns)]
    for section in ("model", "augment", "train"):
        pairs = [(f"**{section}**", "")] + [(item.name, repr(getattr(getattr(config, section), item.name)))
                                            for item in dataclasses.fields(getattr(config, section))]
        pairs += [("", "")] * (-len(pairs) % columns)
        for start in range(0, len(pairs), columns):
            lines.append("| " + " | ".join(f"{name} | {value}" for name, value in pairs[start:start + columns]) + " |")
    return "\n".join(lines)


def device_label(description: str) -> str:
    """A run's device line without the '|' separators (they would split a Markdown table cell)."""
    return description.replace(" | ", ", ")


def data_label(source: str, name: str | None = None) -> str:
    """What data a run used, in words: generated data is always called that, never CIFAR-10."""
    if source == "synthetic":
        return "generated data (10 made-up classes, not CIFAR-10)"
    return f"{name or 'CIFAR-10'} ({source})"


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def best_epoch(history: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    values = [(record[key], record["epoch"]) for record in history if key in record]
    if not values:
        return None
    accuracy, epoch = max(values)
    return {"accuracy": accuracy, "epoch": epoch}


def write_json_atomic(data: dict[str, Any], path: Path) -> None:
    text = json.dumps(data, indent=2, default=float)
    atomic_write(path, lambda file: file.write(text.encode()))


# ----------------------------------------------------------------------------- summary


def build_summary(state: TrainState, config: Config, runtime: Runtime, data: DataSplits, final: dict[str, Any], final_predictions: np.ndarray) -> dict[str, Any]:
    """Everything a reader needs to trust (or reproduce) the result, as plain JSON types."""
    num_classes = config.model.num_classes
    matrix = confusion_matrix(data.test_labels, final_predictions, num_classes)
    per_class = {name: float(matrix[i, i] / max(1, matrix[i].sum())) for i, name in enumerate(data.classes)}
    history = state.history
    steady = [r["images_per_second"] for r in history[1:]] or [r["images_per_second"] for r in history]
    return {
        "preset": config.preset, "config": config.to_dict(),
        "device": runtime.description, "torch_version": torch.__version__, "python_version": python_platform.python_version(),
        "data_source": data.source, "train_images": int(len(data.train_labels)), "val_images": int(len(data.val_labels)),
        "test_images": int(len(data.test_labels)), "parameters": count_parameters(state.model),
        "flops_per_image": flops_per_image(state.model, config.model.image_size),
        "images_per_second": float(np.median(steady)), "train_seconds": state.train_seconds,
        "wall_seconds": state.wall_seconds, "steps": state.step,
        "epochs": len(history), "history": history,
        "final_test_accuracy": final,
        "best_epoch_test_accuracy": {
            "note": "chosen on the test set: optimistic; reported only to compare with write-ups that quote it",
            "raw": best_epoch(history, "test_accuracy"), "ema": best_epoch(history, "ema_test_accuracy"),
        },
        "best_val_accuracy": state.best_val_accuracy if state.best_val_accuracy >= 0 else None,
        "per_class_accuracy": per_class, "confusion_matrix": matrix.tolist(),
    }


def choose_reported_weights(state: TrainState) -> tuple[str, str]:
    """("ema" | "raw", why): the better on the validation split when there is one; without one, the EMA once its
    decay ramp is done (before that it mostly follows the recent raw weights and is not a separate model), else raw."""
    if state.ema is None:
        return "raw", "no EMA"
    last = state.history[-1]
    if "val_accuracy" in last:
        better = "ema" if last["ema_val_accuracy"] >= last["val_accuracy"] else "raw"
        return better, f"higher validation accuracy ({last['ema_val_accuracy']:.4f} EMA vs {last['val_accuracy']:.4f} raw)"
    if state.ema.warmed_up(state.step):
        return "ema", "no validation split; EMA warm-up done"
    return "raw", f"no validation split; EMA decay still ramping at step {state.step} (reaches {state.ema.decay} later)"


def run_facts(state: TrainState, config: Config, run: dict[str, Any]) -> dict[str, Any]:
    """Processes, devices and, for a budgeted run, the budget against the time taken."""
    facts = {"world_size": run.get("world_size", 1), "devices": run.get("devices", [])}
    if state.budget_plan is not None:
        budget = config.train.time_budget_minutes * 60 if config.train.time_budget_minutes else state.budget_plan["budget_seconds"]
        started = run.get("started_monotonic")
        facts["time_budget"] = {"budget_seconds": budget, "planned_steps": state.total_steps, "epochs": len(state.history),
                                "actual_seconds": None if started is None else time.monotonic() - started,
                                "actual_note": "all sessions of the run (resumes included): start-up, compile, training, evaluation, checkpoints, final evaluation; a killed session counts up to its last checkpoint",
                                "plan": state.budget_plan}
    return facts


def finish(state: TrainState, config: Config, runtime: Runtime, data: DataSplits, device_data: DeviceData, out_dir: Path,
           run: dict[str, Any] | None = None) -> FitResult:
    """Final test evaluation (raw, EMA, flip TTA), run_summary.json and plots; returns the FitResult.

    Args:
        run: facts of this fit call: world_size, devices, started_monotonic (time.monotonic() when fit() began).
    """
    images, labels, batch = device_data.test_images, device_data.test_labels, config.train.eval_batch_size
    last = state.history[-1]  # raw and EMA test accuracy of the final weights were measured at the last epoch
    weights, why = choose_reported_weights(state)
    final_model = state.ema.module if weights == "ema" else state.model
    final: dict[str, Any] = {"raw": last["test_accuracy"]}
    if state.ema is not None:
        final["ema"] = last["ema_test_accuracy"]
    chosen = evaluate(final_model, images, labels, runtime, batch, tta=config.train.tta)
    if config.train.tta:
        final["tta"] = chosen.accuracy
    final["reported"] = chosen.accuracy
    final["reported_is"] = "+".join([weights] + (["flip-tta"] if config.train.tta else []))
    final["reported_because"] = why
    summary = build_summary(state, config, runtime, data, final, chosen.predictions) | run_facts(state, config, run or {})
    atomic_write(out_dir / "test_predictions.npy", lambda file: np.save(file, chosen.predictions))  # for the notebook after torchrun
    write_json_atomic(summary, out_dir / "run_summary.json")
    print(f"final test accuracy ({final['reported_is']}): {final['reported']:.4f} | raw {final['raw']:.4f} | summary: {out_dir / 'run_summary.json'}")
    result = FitResult(config, out_dir, "finished", state.step, state.history, summary, final_model, data, chosen.predictions)
    if config.train.report_plots:
        save_all_plots(result, show=False)
    return result


# ----------------------------------------------------------------------------- plots


def _finished(result: FitResult) -> bool:
    if result.status != "finished":
        print(f"Training stopped early at step {result.step}; run again with the same OUT_DIR to finish, then the plots are drawn.")
        return False
    return True


def finish_figure(figure, path: Path, show: bool) -> Path:
    """Save the figure as PNG; display it inline when asked and running under IPython; free it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120, bbox_inches="tight"))
    if show:
        _display(figure)
    plt.close(figure)
    return path


def _display(figure) -> None:
    """Show a figure inline under IPython (nothing elsewhere)."""
    try:
        from IPython.display import display

        display(figure)
    except ImportError:
        pass


def plot_curves(result: FitResult, show: bool = True) -> Path | None:
    """Loss, accuracy (train / test / EMA / val) and learning rate per epoch."""
    if not _finished(result):
        return None
    import matplotlib.pyplot as plt

    history = result.history
    epochs = [r["epoch"] for r in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train (augmented)")
    evaluated = [r for r in history if "test_loss" in r]  # evaluation runs on a schedule, not at every epoch
    axes[0].plot([r["epoch"] for r in evaluated], [r["test_loss"] for r in evaluated], label="test")
    for key, label in [("train_accuracy", "train (augmented)"), ("test_accuracy", "test"), ("ema_test_accuracy", "test, EMA"), ("val_accuracy", "val")]:
        points = [(r["epoch"], r[key]) for r in history if key in r]
        if points:
            axes[1].plot(*zip(*points), label=label, marker="." if len(points) < len(history) else None)
    axes[2].plot(epochs, [r["lr"] for r in history])
    for axis, title in zip(axes, ["loss", "accuracy", "learning rate (end of epoch)"]):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    return finish_figure(figure, result.out_dir / "curves.png", show)


def plot_confusion(result: FitResult, show: bool = True) -> Path | None:
    """Confusion matrix of the reported model on the test set, row-normalised."""
    if not _finished(result):
        return None
    import matplotlib.pyplot as plt

    matrix = np.asarray(result.summary["confusion_matrix"], dtype=float)
    normalised = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    classes = result.data.classes
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    for (row, column), value in np.ndenumerate(normalised):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value > 0.5 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    figure.colorbar(image)
    return finish_figure(figure, result.out_dir / "confusion.png", show)


def plot_misclassified(result: FitResult, count: int = 24, show: bool = True) -> Path | None:
    """A grid of test images the reported model got wrong, with true and predicted labels."""
    if not _finished(result):
        return None
    import matplotlib.pyplot as plt

    data, predictions = result.data, result.final_predictions
    all_wrong = np.flatnonzero(predictions != data.test_labels)
    # A seeded sample over the whole test set: test sets are often stored sorted by class.
    wrong = np.sort(np.random.default_rng(0).choice(all_wrong, size=min(count, len(all_wrong)), replace=False))
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, wrong):
        axis.imshow(data.test_images[index])
        axis.set_title(f"{data.classes[data.test_labels[index]]}\n→ {data.classes[predictions[index]]}", fontsize=8, color="crimson")
    figure.suptitle(f"misclassified test images (true → predicted), a sample of {len(all_wrong)}")
    return finish_figure(figure, result.out_dir / "misclassified.png", show)


def plot_attention(result: FitResult, count: int = 10, show: bool = True) -> Path | None:
    """Last-layer attention of the class token (or, without one, the mean over tokens) on one test image per class."""
    if not _finished(result):
        return None
    import matplotlib.pyplot as plt

    model, data = result.model, result.data
    device = next(model.parameters()).device
    # The first test image of each class (test sets are often sorted by class).
    picks = [int(np.flatnonzero(data.test_labels == label)[0]) for label in np.unique(data.test_labels)][:count]
    count = len(picks)
    images = torch.from_numpy(data.test_images[picks].transpose(0, 3, 1, 2).copy()).to(device)
    maps = model.attention_maps(normalize(images)).float().mean(1)  # (B, N, N) averaged over heads
    has_cls = result.config.model.pool == "cls"
    weights = maps[:, 0, 1:] if has_cls else maps.mean(1)  # (B, tokens): what the pooled output attends to
    side = int(round(weights.shape[-1] ** 0.5))
    size = result.config.model.image_size
    grids = weights[:, : side * side].reshape(-1, side, side).cpu().numpy()
    figure, axes = plt.subplots(2, count, figsize=(count * 1.5 + 1.0, 3.6), squeeze=False)
    overlay = None
    for column in range(count):
        axes[0, column].imshow(data.test_images[picks[column]])
        axes[0, column].set_title(data.classes[data.test_labels[picks[column]]], fontsize=8)
        axes[1, column].imshow(data.test_images[picks[column]])
        overlay = axes[1, column].imshow(grids[column], cmap="inferno", alpha=0.6, vmin=0, vmax=float(grids.max()),
                                         extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="bilinear")
        axes[0, column].axis("off")
        axes[1, column].axis("off")
    figure.colorbar(overlay, ax=axes[1].tolist(), fraction=0.02, pad=0.01, label="attention weight")
    who = "the CLS token's attention to each patch" if has_cls else "the mean attention each patch receives (no CLS token)"
    figure.suptitle(f"last block: {who}, mean over heads; one test image per class")
    return finish_figure(figure, result.out_dir / "attention.png", show)


PLOTS = dict(zip(REPORT_PLOTS, (plot_curves, plot_confusion, plot_misclassified, plot_attention)))


def show_plot(result: FitResult, name: str) -> None:
    """Show `<name>.png` that `fit` saved in OUT_DIR (drawn now if it was not saved); name is a key of PLOTS."""
    from IPython.display import Image, display

    assert name in PLOTS, f"unknown plot {name!r}; choose one of {sorted(PLOTS)}"
    if not _finished(result):
        return
    path = result.out_dir / f"{name}.png"
    if not path.exists():
        PLOTS[name](result, show=False)
    display(Image(filename=str(path)))


def save_all_plots(result: FitResult, show: bool = False) -> list[Path]:
    """Write curves.png, confusion.png, misclassified.png and attention.png to the run's folder."""
    return [plot_curves(result, show=show), plot_confusion(result, show=show), plot_misclassified(result, show=show), plot_attention(result, show=show)]


SEED_PUBLISHED = "88% (best epoch, chosen on test; real CIFAR-10, 200 epochs, their GPU)"


def results_table(result: FitResult, data_name: str | None = None) -> str:
    """Markdown table: this run's final accuracy, its data and device, beside the seed write-up's published figure.

    Args:
        data_name: what to call a real data set (e.g. "CIFAR-10, JPEG copy"); generated data is always named so.
    """
    if not _finished(result):
        return "*(training not finished yet)*"
    summary = result.summary
    final = summary["final_test_accuracy"]
    best = summary["best_epoch_test_accuracy"]["ema"] or summary["best_epoch_test_accuracy"]["raw"]
    data = data_label(summary["data_source"], data_name)
    generated = summary["data_source"] == "synthetic"
    rows = [
        "| run | data | device | params | epochs | train time | test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| this run, preset `{summary['preset']}`: final epoch ({final['reported_is']}) | {data} | {device_label(summary['device'])} | "
        f"{summary['parameters'] / 1e6:.2f} M | {summary['epochs']} | {summary['train_seconds'] / 60:.1f} min | **{100 * final['reported']:.2f}%** |",
        f"| this run: best epoch, chosen on test (for comparison only) | {data} | | | epoch {best['epoch']} | | {100 * best['accuracy']:.2f}% |",
        f"| seed write-up (768x12 SPT ViT), published | real CIFAR-10 | their GPU | {parameters_of(PRESETS['seed']().model) / 1e6:.1f} M "
        f"(our build) | 200 | not reported | {SEED_PUBLISHED} |",
    ]
    if generated:
        rows.append("")
        rows.append("*This run trained on generated data, not CIFAR-10: its accuracy says the pipeline works and is not "
                    "comparable with the seed write-up's CIFAR-10 figure.*")
    return "\n".join(rows)


def stamp_notebook(notebook_path: str | Path, out_dir: str | Path, data_name: str | None = None) -> None:
    """Put a first cell into an executed notebook: device, data, date and wall time of the run it shows.

    Args:
        notebook_path: the notebook papermill wrote (its metadata holds the run's duration).
        out_dir: the run's OUT_DIR (its run_summary.json names the device and the data).
        data_name: as for `results_table`.
    """
    import nbformat

    notebook = nbformat.read(str(notebook_path), as_version=4)
    summary_path = Path(out_dir) / "run_summary.json"
    summary = json.loads(summary_path.read_text())
    duration = notebook.metadata.get("papermill", {}).get("duration")
    wall = f"{duration / 60:.1f} min (the whole notebook, papermill)" if duration else "not recorded"
    cores = f", {os.cpu_count()} CPU cores" if "cpu" in str(summary["device"]).split("|")[0] else ""
    parameters = notebook.metadata.get("papermill", {}).get("parameters", {})
    lines = ["**This copy was executed headless.**", "",
             f"- device: {device_label(summary['device'])}{cores} (torch {summary['torch_version']})",
             f"- data: {data_label(summary['data_source'], data_name)}",
             f"- date: {datetime.datetime.fromtimestamp(summary_path.stat().st_mtime).strftime('%Y-%m-%d %H:%M')} (run_summary.json written)",
             f"- wall time: {wall}; training {summary['train_seconds'] / 60:.1f} min",
             "- parameters: " + ", ".join(f"`{name} = {value!r}`" for name, value in parameters.items())]
    widgets = 0
    for cell in notebook.cells:  # a widget's saved text is its first frame, a bar frozen at 0%
        if cell.cell_type == "code":
            kept = [output for output in cell.outputs if "application/vnd.jupyter.widget-view+json" not in output.get("data", {})]
            widgets, cell.outputs = widgets + len(cell.outputs) - len(kept), kept
    if widgets:
        lines.append(f"- progress bars: {widgets} widget bar(s) removed (a saved notebook cannot run their widgets)")
    notebook.cells.insert(0, nbformat.v4.new_markdown_cell("\n".join(lines)))
    text = nbformat.writes(notebook)
    atomic_write(Path(notebook_path), lambda file: file.write(text.encode()))
