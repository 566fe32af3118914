"""Several processes under `torchrun`: process-group set-up, rank helpers, sharding and reductions (vit and seg).

Everything here is a no-op in a single process (no torchrun, WORLD_SIZE unset or 1), so the training code calls
these helpers unconditionally. The engine is torch.distributed: NCCL between GPUs, gloo on CPUs.
"""
from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist


def launched_with_torchrun() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | None) -> str | None:
    """Join the process group torchrun described in the environment; return the device this rank should use.

    Args:
        device: the DEVICE setting (None/"auto"/"cuda" pick this rank's GPU, cuda:LOCAL_RANK).
    Returns:
        The device string to hand to `select_runtime` (unchanged in a single process).
    """
    if not launched_with_torchrun():
        return device
    on_gpu = torch.cuda.is_available() and device in (None, "", "auto", "cuda")
    if on_gpu:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous part of `items` (first dim); parts differ by at most one element."""
    size, index = world_size(), rank()
    bounds = [len(items) * part // size for part in range(size + 1)]
    return items[bounds[index]:bounds[index + 1]]


def check_divisible(batch_size: int) -> None:
    """The global batch is split evenly so the averaged gradient equals the single-process one."""
    if batch_size % world_size():
        raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {world_size()} processes. "
                         f"Set BATCH_SIZE to a multiple of {world_size()} (or run with another process count).")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of `values` over ranks (in place, returned); unchanged in a single process."""
    if active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object), e.g. a decision only rank 0 measured."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def augmentation_seed(seed: int, step: int) -> int:
    """A seed for rank > 0's augmentation stream, distinct per (seed, rank, step) so each rank draws its own."""
    return (seed * 1_000_003 + rank() * 7_919 + step) % (2**63)


def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel around `model` when several processes train (the model itself when one)."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group together: no rank tears its connections down while another still uses them."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        gc.collect()  # DDP's reducer holds the group in reference cycles: free it now, not during interpreter exit
        dist.destroy_process_group()
