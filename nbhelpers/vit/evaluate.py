"""Evaluation on device-resident uint8 images: accuracy, loss, predictions, optional flip TTA."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbhelpers.platform import Runtime
from nbhelpers import distributed
from nbhelpers.vit.augment import normalize
from nbhelpers.vit.config import Config
from nbhelpers.vit.data import DataSplits
from nbhelpers.vit.state import TrainState


@dataclass
class DeviceData:
    """The whole data set on the device: uint8 (N, 3, H, W) images and int64 (N,) labels per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class Evaluation:
    accuracy: float  # top-1, fraction
    loss: float  # mean cross-entropy
    predictions: np.ndarray  # (N,) int64


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime, batch_size: int, tta: bool = False) -> Evaluation:
    """Accuracy and loss of `model` on uint8 (N, 3, H, W) device images; `tta` averages with the mirror image."""
    model.eval()
    predictions, loss_sum = [], torch.zeros((), device=images.device)
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start:start + batch_size])
        with runtime.autocast():
            logits = model(batch).float()
            if tta:
                logits = (logits.softmax(-1) + model(batch.flip(-1)).float().softmax(-1)).log()
        loss_sum += F.cross_entropy(logits, labels[start:start + batch_size], reduction="sum")
        predictions.append(logits.argmax(-1))
    predicted = torch.cat(predictions)
    accuracy = (predicted == labels).float().mean().item()
    return Evaluation(accuracy, loss_sum.item() / len(images), predicted.cpu().numpy())


def evaluate_sharded(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, runtime: Runtime, batch_size: int) -> tuple[float, float]:
    """(accuracy, mean loss) over all of `images`: each rank evaluates its shard, then the counts are summed."""
    local_images, local_labels = distributed.shard(images), distributed.shard(labels)
    totals = torch.zeros(3, dtype=torch.float64, device=images.device)  # [correct, loss sum, count]
    if len(local_labels):
        local = evaluate(model, local_images, local_labels, runtime, batch_size)
        count = len(local_labels)
        totals += torch.tensor([round(local.accuracy * count), local.loss * count, count], dtype=torch.float64, device=images.device)
    correct, loss_sum, count = distributed.all_reduce_sum(totals).tolist()
    return correct / count, loss_sum / count


def evaluate_epoch(state: TrainState, data: DeviceData, runtime: Runtime, config: Config,
                   models: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Test (and validation) accuracy of the raw and EMA weights, no TTA, sharded over the ranks.

    Args:
        models: {"raw": network, "ema": network} to run (e.g. compiled); default the state's own modules.
    """
    models = models or {"raw": state.model} | ({"ema": state.ema.module} if state.ema is not None else {})
    metrics: dict[str, float] = {}
    splits = {"test": (data.test_images, data.test_labels)} | ({"val": (data.val_images, data.val_labels)} if len(data.val_labels) else {})
    for split, (images, labels) in splits.items():
        for name, model in models.items():
            accuracy, loss = evaluate_sharded(model, images, labels, runtime, config.train.eval_batch_size)
            prefix = "" if name == "raw" else "ema_"
            metrics[f"{prefix}{split}_accuracy"] = accuracy
            if name == "raw":
                metrics[f"{split}_loss"] = loss
    state.model.train()
    return metrics


def to_device(data: DataSplits, device: torch.device) -> DeviceData:
    """The data set's uint8 (N, H, W, 3) arrays as device tensors (N, 3, H, W), labels as int64."""
    tensors = {}
    for split in ("train", "val", "test"):
        images = getattr(data, f"{split}_images")
        tensors[f"{split}_images"] = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
        tensors[f"{split}_labels"] = torch.from_numpy(getattr(data, f"{split}_labels").astype(np.int64)).to(device)
    return DeviceData(**tensors)


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.3f}", f"train {record['train_accuracy']:.3f}"]
    parts += [f"test {record['test_accuracy']:.4f}"] if "test_accuracy" in record else ["(not evaluated)"]
    parts += [f"{key.replace('_accuracy', '')} {record[key]:.4f}" for key in ("ema_test_accuracy", "val_accuracy", "ema_val_accuracy") if key in record]
    parts.append(f"{record['images_per_second']:,.0f} img/s")
    return " | ".join(parts)
