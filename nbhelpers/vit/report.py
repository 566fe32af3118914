"""Final evaluation, run_summary.json, and the plots: curves, confusion matrix, mistakes, attention.

Accuracy reported as *the* result is the final epoch's test accuracy. The best epoch's test accuracy
is also recorded, labelled as chosen on the test set, only to compare with write-ups that report it.
"""
from __future__ import annotations

import json
import time
import platform as python_platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbhelpers.platform import Runtime, atomic_write
from nbhelpers.vit.config import Config
from nbhelpers.vit.data import DataSplits
from nbhelpers.vit.augment import normalize
from nbhelpers.vit.evaluate import evaluate
from nbhelpers.vit.state import FitResult, TrainState

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
                                "actual_note": "this fit() call: data loading, compile, training, evaluation, checkpoints, final evaluation",
                                "plan": state.budget_plan}
    return facts


def finish(state: TrainState, config: Config, runtime: Runtime, data: DataSplits, tensors: dict[str, torch.Tensor], out_dir: Path,
           run: dict[str, Any] | None = None) -> FitResult:
    """Final test evaluation (raw, EMA, flip TTA), run_summary.json and plots; returns the FitResult.

    Args:
        run: facts of this fit call: world_size, devices, started_monotonic (time.monotonic() when fit() began).
    """
    images, labels, batch = tensors["test_images"], tensors["test_labels"], config.train.eval_batch_size
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


def _finish_figure(figure, path: Path, show: bool):
    """Save the figure as PNG; display it inline when asked and running under IPython; free it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120, bbox_inches="tight"))
    if show:
        try:
            from IPython.display import display

            display(figure)
        except ImportError:
            pass
    plt.close(figure)
    return path


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
    return _finish_figure(figure, result.out_dir / "curves.png", show)


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
    return _finish_figure(figure, result.out_dir / "confusion.png", show)


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
    return _finish_figure(figure, result.out_dir / "misclassified.png", show)


def plot_attention(result: FitResult, count: int = 6, show: bool = True) -> Path | None:
    """Last-layer attention of the pooled output over the token grid, on a few test images."""
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
    figure, axes = plt.subplots(2, count, figsize=(count * 1.8, 3.8), squeeze=False)
    for column in range(count):
        axes[0, column].imshow(data.test_images[picks[column]])
        axes[0, column].set_title(data.classes[data.test_labels[picks[column]]], fontsize=8)
        axes[1, column].imshow(data.test_images[picks[column]])
        axes[1, column].imshow(grids[column], cmap="inferno", alpha=0.6, extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="bilinear")
        axes[0, column].axis("off")
        axes[1, column].axis("off")
    figure.suptitle("last-layer attention (mean over heads)")
    return _finish_figure(figure, result.out_dir / "attention.png", show)


PLOTS = {"curves": plot_curves, "confusion": plot_confusion, "misclassified": plot_misclassified, "attention": plot_attention}


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


def results_table(result: FitResult) -> str:
    """Markdown table: this run's final accuracy beside the seed write-up's best-epoch figure."""
    if not _finished(result):
        return "*(training not finished yet)*"
    summary = result.summary
    final = summary["final_test_accuracy"]
    best = summary["best_epoch_test_accuracy"]["ema"] or summary["best_epoch_test_accuracy"]["raw"]
    rows = [
        "| run | params | epochs | train time | test accuracy |",
        "| --- | --- | --- | --- | --- |",
        "| seed write-up (768x12 SPT ViT, 200 epochs) | 56.8 M | 200 | not reported | 88% (best epoch, chosen on test) |",
        f"| this run, preset `{summary['preset']}`: final epoch ({final['reported_is']}) | {summary['parameters'] / 1e6:.1f} M | "
        f"{summary['epochs']} | {summary['train_seconds'] / 60:.1f} min | **{100 * final['reported']:.2f}%** |",
        f"| this run: best epoch, chosen on test (for comparison only) | | epoch {best['epoch']} | | {100 * best['accuracy']:.2f}% |",
    ]
    return "\n".join(rows)
