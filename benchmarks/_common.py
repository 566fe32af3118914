"""Small helpers shared by the benchmark scripts: one JSON line per measurement, device facts, GPU peaks, targets.

Nothing here imports project code, so any benchmark (ViT, segmentation) can use `emit()`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from typing import Any, Callable, Iterator, TextIO

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s, per GPU. The first pattern that matches the
# lower-cased device name wins, so the specific names come before the general ones.
# A pattern mapped to None is a GPU whose peak we do not state (MFU is then null rather than wrong).
PEAK_DENSE_HALF_FLOPS: list[tuple[str, float | None]] = [
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", None),
    (r"h100", 989e12),  # SXM (reported as "H100 80GB HBM3")
    (r"h200", 989e12),
    (r"a100", 312e12),
    (r"\bl4\b", 121e12),
    (r"\bt4\b", 65e12),
    (r"v100", 125e12),
    (r"p100", 18.7e12),  # fp16; P100 has no bf16
]
PEAK_BASIS = "dense bf16/fp16 tensor-core peak"


def emit(record: dict[str, Any], file: TextIO | None = None) -> dict[str, Any]:
    """Print `record` as one JSON line (flushed at once) and return it.

    Args:
        record: plain JSON types; floats that are NaN or infinite become null.
        file: where to print; None = the current sys.stdout.
    Returns:
        The record with non-finite floats replaced by None, as printed.
    """
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in record.items()}
    print(json.dumps(clean, sort_keys=False), file=file or sys.stdout, flush=True)
    return clean


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, else a message naming the fix."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give e.g. 30") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA, else e.g. 'cpu (2 threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type


def peak_flops(name: str) -> float | None:
    """Dense bf16/fp16 peak FLOP/s for a GPU name from `device_name`; None when unknown (CPU, unlisted GPU)."""
    lowered = name.lower()
    for pattern, peak in PEAK_DENSE_HALF_FLOPS:
        if re.search(pattern, lowered):
            return peak
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Fields every measurement carries: device name, torch version."""
    return {"device": device_name(device), "torch": torch.__version__}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a host clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (PyTorch's default for matmuls; select_runtime turns it on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def release_compiled(device: torch.device, compiled: bool) -> None:
    """Drop torch.compile's graphs (when used) and cached GPU memory before measuring the next model."""
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(function: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of `function()`, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def check_target(value: float | None, target: float, higher_is_better: bool = True) -> tuple[bool | None, float | None]:
    """(met, shortfall) of one measured value against a target.

    Args:
        value: the measurement; None = not measurable here (e.g. MFU on a CPU).
        target: the bound the value must reach.
        higher_is_better: True for throughput/MFU (value >= target), False for overheads (value <= target).
    Returns:
        (None, None) when value is None; else met, and the shortfall: how far the value is on the wrong
        side of the target, in the value's units (0.0 when met).
    """
    if value is None:
        return None, None
    gap = target - value if higher_is_better else value - target
    return gap <= 0, max(0.0, gap)


def target_fields(values: dict[str, float | None], targets: dict[str, float], lower_is_better: tuple[str, ...] = (),
                  evaluate: bool = True, stated_for: str = "H100") -> dict[str, Any]:
    """The 'target', 'target_met' and 'shortfall' fields for a measurement with one or more targets.

    Args:
        values: measured value per metric name (keys of `targets`).
        targets: bound per metric name.
        lower_is_better: metric names where smaller is better (overheads).
        evaluate: False where the targets do not apply (they are stated for `stated_for`); met/shortfall are then null.
    Returns:
        {"target": {...metric: bound, "stated_for": ...}, "target_met": bool | None,
         "shortfall": {metric: amount} for missed metrics only, or None when not evaluated}.
    """
    fields: dict[str, Any] = {"target": {**targets, "stated_for": stated_for}}
    results = {name: check_target(values.get(name) if evaluate else None, bound, name not in lower_is_better)
               for name, bound in targets.items()}
    if not evaluate or any(met is None for met, _ in results.values()):
        return fields | {"target_met": None, "shortfall": None}
    shortfall = {name: round(gap, 6) for name, (met, gap) in results.items() if not met}
    return fields | {"target_met": not shortfall, "shortfall": shortfall}


def profile_top_ops(step: Callable[[], Any], device: torch.device, steps: int = 3, rows: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over `steps` calls of `step` (already warmed up): the ops with the most self time.

    Returns:
        Up to `rows` dicts {"op", "ms_per_step", "share", "calls_per_step"}, by device time on CUDA, else CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = profiler.key_averages()

    def self_time(event: Any) -> float:  # microseconds; the CUDA attribute was renamed across torch versions
        if cuda:
            return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
        return float(event.self_cpu_time_total)

    total = sum(self_time(event) for event in averages) or 1.0
    top = sorted(averages, key=self_time, reverse=True)[:rows]
    return [{"op": event.key, "ms_per_step": round(self_time(event) / 1000 / steps, 3),
             "share": round(self_time(event) / total, 4), "calls_per_step": round(event.count / steps, 2)} for event in top]
