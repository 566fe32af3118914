"""GPU-resident batched augmentation for CIFAR-sized uint8 batches, random per sample.

Every step is a tensor op on the input's device with randomness from torch's RNG there (so saving and
restoring RNG states reproduces a run); there is no Python loop over samples and no host sync.
GpuAugment runs: random crop (reflect padding) + horizontal flip as one gather on uint8 -> one
TrivialAugment-style op per image, each op computed only on its own images (the geometric ops share one
grid_sample) -> normalise -> random erasing -> MixUp or CutMix on the batch -> label-smoothed soft targets.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nbhelpers.vit.config import AugmentConfig

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


# ----------------------------------------------------------------------------- batch pipeline

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# ----------------------------------------------------------------------------- normalisation + targets


def _build_channel_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)


@functools.lru_cache(maxsize=8)
def _channel_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached: a blocking host-to-device copy would sync the GPU on every batch. Built outside
    # inference mode so tensors cached during evaluation are also usable while training.
    with torch.inference_mode(False):
        return _build_channel_stats(device)


def normalize_unit(images: Tensor) -> Tensor:
    """Float images in [0, 1] (B, 3, H, W) -> CIFAR-10 normalised float32."""
    # Under torch.compile the constants are traced into the graph (Dynamo would bypass the cache with a warning).
    building = torch.compiler.is_compiling()
    mean, std = _build_channel_stats(images.device) if building else _channel_stats(images.device)
    return (images.float() - mean) / std


def normalize(images: Tensor) -> Tensor:
    """uint8 images (B, 3, H, W) -> CIFAR-10 normalised float32 (the evaluation transform)."""
    assert images.dtype == torch.uint8, f"normalize expects uint8 images, got {images.dtype}; pass the raw 0-255 tensor."
    return normalize_unit(images.float() / 255.0)


def one_hot_smooth(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Integer labels (B,) -> float32 targets (B, num_classes): 1 - smoothing + smoothing/C on the label, smoothing/C elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_targets(labels: Tensor, partner_labels: Tensor, lam: Tensor | float, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Soft targets lam * smooth(labels) + (1 - lam) * smooth(partner_labels), (B, num_classes); rows sum to 1."""
    own = one_hot_smooth(labels, num_classes, smoothing)
    return lam * own + (1.0 - lam) * one_hot_smooth(partner_labels, num_classes, smoothing)


# ----------------------------------------------------------------------------- crop + flip


def _reflect(index: Tensor, size: int) -> Tensor:
    # Same convention as F.pad(mode="reflect"): -1 -> 1, size -> size - 2.
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_crop_flip(images: Tensor, padding: int, flip: bool) -> Tensor:
    """Per-sample random crop after reflect padding and horizontal flip (p = 0.5), as two gathers.

    Args:
        images: (B, C, H, W) of any dtype (uint8 keeps the memory traffic small).
        padding: pixels of reflect padding on each side (0 = no crop); must be < H and < W.
        flip: whether to mirror half of the images.
    Returns:
        (B, C, H, W), same dtype.
    """
    B, C, H, W = images.shape
    assert 0 <= padding < min(H, W), f"crop_padding={padding} must be in [0, {min(H, W)}) for {H}x{W} images."
    device = images.device
    rows = torch.arange(H, device=device).expand(B, H)
    cols = torch.arange(W, device=device).expand(B, W)
    if flip:
        cols = torch.where(torch.rand(B, 1, device=device) < 0.5, W - 1 - cols, cols)
    if padding > 0:
        offsets = torch.randint(-padding, padding + 1, (B, 2), device=device)
        rows = _reflect(rows + offsets[:, :1], H)
        cols = _reflect(cols + offsets[:, 1:], W)
    out = images.gather(2, rows.view(B, 1, H, 1).expand(B, C, H, W))
    return out.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


# ----------------------------------------------------------------------------- random erasing + mixing


def random_erasing(x: Tensor, probability: float, fill: str = "noise") -> Tensor:
    """With `probability` per image, replace one random rectangle (2%-33% of the area, aspect 0.3-3.3).

    Args:
        x: normalised float images (B, C, H, W).
        fill: 'noise' (standard normal, i.e. random in normalised space) or 'zeros' (the mean colour).
    Returns:
        (B, C, H, W) images.
    """
    B, C, H, W = x.shape
    u = torch.rand(B, 5, device=x.device)
    area = (0.02 + (1 / 3 - 0.02) * u[:, 1]) * H * W
    ratio = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u[:, 2])
    height = (area * ratio).sqrt().round().clamp(1, H)
    width = (area / ratio).sqrt().round().clamp(1, W)
    top = ((H - height + 1) * u[:, 3]).floor().view(B, 1, 1)
    left = ((W - width + 1) * u[:, 4]).floor().view(B, 1, 1)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    inside = (rows >= top) & (rows < top + height.view(B, 1, 1)) & (cols >= left) & (cols < left + width.view(B, 1, 1))
    inside = inside & (u[:, 0] < probability).view(B, 1, 1)  # (B, H, W)
    filler = torch.randn_like(x) if fill == "noise" else torch.zeros_like(x)
    return _choose(inside.unsqueeze(1), filler, x)


def _sample_beta(alpha: float, device: torch.device) -> Tensor:
    concentration = torch.full((), float(alpha), device=device)
    # validate_args=False: argument checks would call .item() and sync the GPU.
    return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()


def _cutmix_box(lam: Tensor, H: int, W: int) -> tuple[Tensor, Tensor]:
    """Box covering about (1 - lam) of the image at a random centre, clipped: ((H, W) bool, kept fraction)."""
    cut = (1.0 - lam).sqrt()
    half_h, half_w = (H * cut).floor().div(2).floor(), (W * cut).floor().div(2).floor()
    centre = torch.rand(2, device=lam.device)
    centre_y, centre_x = (centre[0] * H).floor(), (centre[1] * W).floor()
    top, bottom = (centre_y - half_h).clamp(0, H), (centre_y + half_h).clamp(0, H)
    left, right = (centre_x - half_w).clamp(0, W), (centre_x + half_w).clamp(0, W)
    rows = torch.arange(H, device=lam.device).view(H, 1)
    cols = torch.arange(W, device=lam.device).view(1, W)
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return box, 1.0 - (bottom - top) * (right - left) / (H * W)


def mix_batch(
    x: Tensor, labels: Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
    mix_prob: float = 1.0, smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """MixUp or CutMix (one per batch, 50/50 when both are on) with the batch rolled by one, with prob mix_prob.

    Args:
        x: float images (B, C, H, W); labels: int64 (B,). Sample i is mixed with sample i - 1.
        mixup_alpha / cutmix_alpha: Beta(alpha, alpha) parameters; 0 disables that method.
    Returns:
        (images (B, C, H, W), soft targets (B, num_classes) summing to 1). CutMix's lambda is the kept area.
    """
    assert mixup_alpha > 0 or cutmix_alpha > 0, "mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0."
    partner, partner_labels = x.roll(1, dims=0), labels.roll(1, dims=0)
    candidates: list[tuple[Tensor, Tensor]] = []
    if mixup_alpha > 0:
        lam = _sample_beta(mixup_alpha, x.device)
        candidates.append((_blend(x, partner, lam), lam))
    if cutmix_alpha > 0:
        box, kept = _cutmix_box(_sample_beta(cutmix_alpha, x.device), x.shape[-2], x.shape[-1])
        candidates.append((_choose(box, partner, x), kept))
    images, lam = candidates[0]
    if len(candidates) == 2:  # chosen on the device: no host sync
        use_second = torch.rand((), device=x.device) < 0.5
        images, lam = _choose(use_second, candidates[1][0], images), torch.where(use_second, candidates[1][1], lam)
    if mix_prob < 1.0:
        apply = torch.rand((), device=x.device) < mix_prob
        images, lam = _choose(apply, images, x), torch.where(apply, lam, torch.ones_like(lam))
    return images, mix_targets(labels, partner_labels, lam, num_classes, smoothing)


# ----------------------------------------------------------------------------- pipeline


class GpuAugment:
    """The training transform: uint8 images + int64 labels -> normalised float32 images + soft targets."""

    def __init__(self, config: AugmentConfig, num_classes: int):
        """Args: an AugmentConfig whose ranges `config.build_config` checked (the one place that checks them)."""
        self.config, self.num_classes = config, num_classes

    @property
    def mixes(self) -> bool:
        """Whether MixUp/CutMix can happen at all with this config."""
        return (self.config.mixup_alpha > 0 or self.config.cutmix_alpha > 0) and self.config.mix_prob > 0

    def augment_pixels(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> crop, flip and TrivialAugment -> float32 in [0, 1] (before normalisation)."""
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, (
            f"GpuAugment expects uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}; keep the data set as uint8."
        )
        config = self.config
        if config.crop_padding > 0 or config.flip:
            images = random_crop_flip(images, config.crop_padding, config.flip)
        x = images.float() / 255.0
        if config.trivial_augment and config.augment_magnitude > 0:
            x = trivial_augment(x, config.augment_magnitude)
        return x

    def __call__(self, images: Tensor, labels: Tensor, mix: bool = True) -> tuple[Tensor, Tensor]:
        """Args: images uint8 (B, 3, H, W); labels int64 (B,); mix=False skips MixUp/CutMix (last epochs).
        Returns: normalised float32 images (B, 3, H, W) and float32 soft targets (B, num_classes) summing to 1.
        """
        assert labels.shape == images.shape[:1], f"labels {tuple(labels.shape)} do not match a batch of {images.shape[0]} images."
        x = normalize_unit(self.augment_pixels(images))
        if self.config.random_erasing > 0:
            x = random_erasing(x, self.config.random_erasing)
        if mix and self.mixes:
            c = self.config
            return mix_batch(x, labels, self.num_classes, c.mixup_alpha, c.cutmix_alpha, c.mix_prob, c.label_smoothing)
        return x, one_hot_smooth(labels, self.num_classes, self.config.label_smoothing)
