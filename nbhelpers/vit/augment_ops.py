"""TrivialAugment-style op set on float image batches: photometric and geometric ops, op assignment, dispatch."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# TrivialAugment strength at magnitude 1 (torchvision's RandAugment ranges, translate as a fraction of the side).
MAX_COLOR_FACTOR = 0.9  # brightness / contrast / saturation / sharpness factor in 1 +- this
MAX_POSTERIZE_BITS_DROPPED = 4  # 8 bits down to 4
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3

# ----------------------------------------------------------------------------- TrivialAugment ops
# Each op maps float images in [0, 1] (B, 3, H, W) and a signed magnitude (B, 1, 1, 1) in [-1, 1] to images.


def _gray(x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 1, H, W), ITU-R 601 luma like torchvision
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(image: Tensor, base: Tensor, factor: Tensor) -> Tensor:  # factor 1 -> image, 0 -> base
    return base + factor * (image - base)


def _choose(condition: Tensor, if_true: Tensor, if_false: Tensor) -> Tensor:
    # lerp with a 0/1 weight is exact and, unlike torch.where with a broadcast mask, also fast on CPU.
    return torch.lerp(if_false, if_true, condition.to(if_false.dtype))


def _factor(m: Tensor) -> Tensor:
    return 1.0 + MAX_COLOR_FACTOR * m


def brightness(x: Tensor, m: Tensor) -> Tensor:
    return x * _factor(m)


def contrast(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(2, 3), keepdim=True), _factor(m))


def saturation(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, _gray(x), _factor(m))


def sharpness(x: Tensor, m: Tensor) -> Tensor:
    # PIL's smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as a separable 3x3 box sum plus 4x the
    # centre: shifted adds are ~10x faster than a depthwise conv on CPU and as fast on GPU.
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = padded[:, :, :-2] + padded[:, :, 1:-1] + padded[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    return _blend(x, (box + 4.0 * x) / 13.0, _factor(m))


def posterize(x: Tensor, m: Tensor) -> Tensor:
    step = 2.0 ** (m.abs() * MAX_POSTERIZE_BITS_DROPPED).round()  # keep 8 - dropped bits
    levels = (x * 255.0).round()  # back to exact 0..255 levels first, so step 1 is the identity
    return torch.floor(levels / step) * step / 255.0


def solarize(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(x > 1.0 - m.abs(), 1.0 - x, x)  # strict: magnitude 0 inverts nothing


def autocontrast(x: Tensor, m: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high <= low  # a constant channel is left as it is
    scale = torch.where(flat, torch.ones_like(high), 1.0 / (high - low).clamp_min(1e-6))  # (B, 3, 1, 1)
    return (x - torch.where(flat, torch.zeros_like(low), low)) * scale


PHOTOMETRIC_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": lambda x, m: x,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "sharpness": sharpness,
    "posterize": posterize,
    "solarize": solarize,
    "autocontrast": autocontrast,
}
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OP_NAMES = tuple(PHOTOMETRIC_OPS) + GEOMETRIC_OPS


def affine(x: Tensor, geometric_op: Tensor, m: Tensor) -> Tensor:
    """One batched grid_sample: sample i gets GEOMETRIC_OPS[geometric_op[i]] with signed magnitude m[i] (B,).

    Samples whose index is outside range(len(GEOMETRIC_OPS)) get the identity. Fill is black; bilinear.
    """
    def amount(index: int, limit: float) -> Tensor:
        return torch.where(geometric_op == index, m * limit, torch.zeros_like(m))

    angle = amount(0, math.radians(MAX_ROTATE_DEGREES))
    shear_x, shear_y = amount(1, MAX_SHEAR), amount(2, MAX_SHEAR)
    # Normalised coordinates span 2 per side, so shifting by a fraction t of the side is 2t.
    shift_x, shift_y = amount(3, 2 * MAX_TRANSLATE), amount(4, 2 * MAX_TRANSLATE)
    cos, sin = angle.cos(), angle.sin()  # at most one of angle / shear / shift is non-zero per sample
    B, _, H, W = x.shape
    # F.affine_grid(theta, align_corners=False) written out: broadcasting beats its tiny-matrix bmm on CPU.
    column = ((torch.arange(W, device=x.device, dtype=x.dtype) * 2 + 1) / W - 1).view(1, 1, W)
    row = ((torch.arange(H, device=x.device, dtype=x.dtype) * 2 + 1) / H - 1).view(1, H, 1)
    per_sample = lambda value: value.to(x.dtype).view(B, 1, 1)  # noqa: E731
    grid_x = per_sample(cos) * column + per_sample(shear_x - sin) * row + per_sample(shift_x)
    grid_y = per_sample(sin + shear_y) * column + per_sample(cos) * row + per_sample(shift_y)
    grid = torch.stack([grid_x, grid_y], dim=-1)  # (B, H, W, 2): where each output pixel samples the input
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------- TrivialAugment dispatch
# Each image gets one op, and each op runs only on its own images: a random permutation of the batch is cut
# into len(OP_NAMES) contiguous chunks whose sizes depend only on B, and op k transforms chunk k. The sizes
# being fixed keeps shapes static (no host sync; torch.compile / CUDA graphs see the same graph every step).
# Per image the op is uniform up to rounding: the first B % len(OP_NAMES) ops get one image more per batch
# (512 images: 40 vs 39). Unlike i.i.d. draws, the count per op is the same in every batch.


def op_chunk_sizes(batch_size: int) -> list[int]:
    """Number of images that get each op of OP_NAMES in a batch of batch_size (fixed; sums to batch_size)."""
    base, extra = divmod(batch_size, len(OP_NAMES))
    return [base + int(index < extra) for index in range(len(OP_NAMES))]


def sample_op_assignment(batch_size: int, magnitude: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random (order (B,) int64 permutation, signed strength (B,) in [-magnitude, magnitude]) for apply_ops."""
    order = torch.randperm(batch_size, device=device)
    strength = torch.rand(batch_size, device=device) * magnitude
    return order, torch.where(torch.rand(batch_size, device=device) < 0.5, -strength, strength)


def _build_op_at_position(batch_size: int, device: torch.device) -> Tensor:
    # (B,) index into OP_NAMES for each position of the shuffled batch: chunk k holds op k. Static shapes only.
    sizes = op_chunk_sizes(batch_size)
    return torch.cat([torch.full((size,), index, device=device) for index, size in enumerate(sizes)])


@functools.lru_cache(maxsize=16)
def _cached_op_at_position(batch_size: int, device_type: str, device_index: int | None) -> Tensor:
    # Built outside inference mode so a tensor first cached during evaluation is also usable while training.
    with torch.inference_mode(False):
        return _build_op_at_position(batch_size, torch.device(device_type, device_index))


def _op_at_position(batch_size: int, device: torch.device) -> Tensor:
    """(B,) int64 index into OP_NAMES for each position of the shuffled batch. Shared: read it, never modify it."""
    if torch.compiler.is_compiling():
        # Dynamo would bypass the lru_cache anyway (with a warning); traced, the build is part of the graph.
        return _build_op_at_position(batch_size, device)
    return _cached_op_at_position(batch_size, device.type, device.index)  # eager: 13 fills + a cat once, not per step


def op_per_image(order: Tensor) -> Tensor:
    """Index into OP_NAMES of the op that apply_ops(x, order, ...) gives each image, (B,) int64."""
    op_at_position = _op_at_position(order.shape[0], order.device)
    return torch.empty_like(op_at_position).index_copy_(0, order, op_at_position)


def apply_ops(x: Tensor, order: Tensor, signed_magnitude: Tensor) -> Tensor:
    """Image order[j] gets op k of OP_NAMES when position j lies in chunk k, at strength signed_magnitude[j].

    Args:
        x: float images in [0, 1], (B, 3, H, W).
        order: a permutation of range(B); chunk sizes come from op_chunk_sizes(B).
        signed_magnitude: (B,) in [-1, 1], per position in `order`.
    Returns:
        Float images in [0, 1], (B, 3, H, W).
    """
    B, num_photometric = x.shape[0], len(PHOTOMETRIC_OPS)
    sizes = op_chunk_sizes(B)[:num_photometric]
    split = sum(sizes)  # positions [0, split) get photometric ops, the rest geometric ones
    shuffled, m = x.index_select(0, order), signed_magnitude.view(B, 1, 1, 1)
    chunks = zip(PHOTOMETRIC_OPS.values(), shuffled[:split].split(sizes), m[:split].split(sizes))
    pieces = [op(images, strength) for op, images, strength in chunks]
    geometric_op = _op_at_position(B, x.device)[split:] - num_photometric
    pieces.append(affine(shuffled[split:], geometric_op, signed_magnitude[split:]))  # one grid_sample for all
    out = torch.cat(pieces).clamp_(0.0, 1.0)  # (B, 3, H, W), shuffled order
    return torch.empty_like(out).index_copy_(0, order, out)


def trivial_augment(x: Tensor, magnitude: float = 1.0) -> Tensor:
    """TrivialAugment-style: each image gets one op from OP_NAMES, uniformly, with strength U(0, magnitude).

    Args:
        x: float images in [0, 1], (B, 3, H, W).
        magnitude: scales every op's range (0 = identity, 1 = full range).
    Returns:
        Float images in [0, 1], (B, 3, H, W).
    """
    return apply_ops(x, *sample_op_assignment(x.shape[0], magnitude, x.device))
