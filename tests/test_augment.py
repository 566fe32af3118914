"""GpuAugment and its ops: shapes, per-sample randomness, what each op does to pixels, soft targets."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from nbhelpers.vit import augment
from nbhelpers.vit.augment import GpuAugment, mix_batch, mix_targets, normalize, one_hot_smooth
from nbhelpers.vit.config import AugmentConfig, build_config

OFF = AugmentConfig(crop_padding=0, flip=False, trivial_augment=False, mixup_alpha=0.0, cutmix_alpha=0.0,
                    random_erasing=0.0, label_smoothing=0.0)


def only(**settings) -> AugmentConfig:
    return dataclasses.replace(OFF, **settings)


def batch(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return images, torch.arange(size) % 10


def test_shapes_dtypes_and_ranges():
    images, labels = batch()
    augmenter = GpuAugment(AugmentConfig(), num_classes=10)
    x, targets = augmenter(images, labels)
    assert x.shape == images.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert targets.shape == (16, 10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(16)) and (targets >= 0).all()
    pixels = augmenter.augment_pixels(images)
    assert pixels.dtype == torch.float32 and pixels.min() >= 0 and pixels.max() <= 1
    # Without erasing (noise) or mixing the output stays inside the normalised image of [0, 1].
    x, _ = GpuAugment(dataclasses.replace(AugmentConfig(), random_erasing=0.0), 10)(images, labels, mix=False)
    mean, std = torch.tensor(augment.CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(augment.CIFAR10_STD).view(1, 3, 1, 1)
    assert (x >= -mean / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()


def test_every_sample_gets_its_own_augmentation():
    images = batch(1)[0].expand(32, -1, -1, -1).contiguous()
    torch.manual_seed(0)  # unseeded, two of 32 samples could draw the same crop, flip and identity op (~1%)
    x, _ = GpuAugment(AugmentConfig(), 10)(images, torch.zeros(32, dtype=torch.long), mix=False)
    flat = x.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(32) * 1e9
    assert distances.min() > 1e-3, "two samples got identical augmentations"


def test_flip_only_mirrors_about_half():
    images, labels = batch(32)
    torch.manual_seed(0)
    x = GpuAugment(only(flip=True), 10).augment_pixels(images)
    original = images.float() / 255
    same = (x == original).flatten(1).all(1)
    mirrored = (x == original.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()


def test_crop_shifts_content_within_padding():
    images, _ = batch(32)
    torch.manual_seed(0)
    out = augment.random_crop_flip(images, padding=4, flip=False)
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")  # the reference for reflect padding
    shifts = []
    for i in range(32):
        found = [(dy, dx) for dy in range(9) for dx in range(9)
                 if torch.equal(padded[i, :, dy:dy + 32, dx:dx + 32], out[i].float())]
        assert found, f"sample {i} is not a crop of its reflect-padded image"
        shifts.append(found[0])
    assert len(set(shifts)) > 5 and any(shift != (4, 4) for shift in shifts)


def test_photometric_ops_are_identity_at_zero_and_change_images_at_full_strength():
    x = batch(8)[0].float() / 255
    zero, full = torch.zeros(8, 1, 1, 1), torch.ones(8, 1, 1, 1)
    for name, op in augment.PHOTOMETRIC_OPS.items():
        if name not in ("identity", "autocontrast"):  # autocontrast has no strength
            assert torch.allclose(op(x, zero), x, atol=1e-6), name
        if name != "identity":
            assert not torch.allclose(op(x, full).clamp(0, 1), x, atol=1e-3), name
    assert torch.allclose(augment.posterize(x, full) * 255 % 16, torch.zeros_like(x), atol=1e-3)  # 4 bits kept
    kernel = torch.ones(3, 1, 3, 3)
    kernel[:, :, 1, 1] = 5.0  # PIL's smoothing kernel, as a reference for the box-sum implementation
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel / 13, groups=3)
    assert torch.allclose(augment.sharpness(x, full), blurred + (1 + augment.MAX_COLOR_FACTOR) * (x - blurred), atol=1e-5)
    low_contrast = 0.4 + 0.2 * x
    low_contrast[0, 1] = 0.5  # a constant channel stays unchanged
    stretched = augment.autocontrast(low_contrast, zero)
    assert torch.allclose(stretched[0, 1], torch.full((32, 32), 0.5))
    stretched[0, 1] = torch.arange(2.0).repeat(32, 16)  # put a 0..1 channel in its place for the checks below
    assert torch.allclose(stretched.amin((2, 3)), torch.zeros(8, 3), atol=1e-5)
    assert torch.allclose(stretched.amax((2, 3)), torch.ones(8, 3), atol=1e-5)


def test_affine_translates_identity_and_fills_black():
    x = batch(4)[0].float() / 255
    ops = torch.tensor([-1, 3, 3, 4])  # identity, translate_x, translate_x, translate_y
    shift = 8 / 32 / augment.MAX_TRANSLATE  # magnitude that moves 8 pixels
    out = augment.affine(x, ops, torch.tensor([1.0, shift, -shift, shift]))
    assert torch.allclose(out[0], x[0], atol=1e-5)
    assert torch.allclose(out[1, :, :, :24], x[1, :, :, 8:], atol=1e-4) and out[1, :, :, 24:].abs().max() < 1e-4
    assert torch.allclose(out[2, :, :, 8:], x[2, :, :, :24], atol=1e-4) and out[2, :, :, :8].abs().max() < 1e-4
    assert torch.allclose(out[3, :, :24], x[3, :, 8:], atol=1e-4)


def test_affine_matches_torch_affine_grid_for_rotation_and_shear():
    x = torch.rand(3, 3, 32, 32)
    ops, m = torch.tensor([0, 1, 2]), torch.tensor([1.0, -1.0, 0.5])  # rotate 30 deg, shear_x -0.3, shear_y 0.15
    angle = math.radians(augment.MAX_ROTATE_DEGREES)
    theta = torch.tensor([
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]],
        [[1.0, -augment.MAX_SHEAR, 0.0], [0.0, 1.0, 0.0]],
        [[1.0, 0.0, 0.0], [0.5 * augment.MAX_SHEAR, 1.0, 0.0]],
    ])
    expected = F.grid_sample(x, F.affine_grid(theta, [3, 3, 32, 32], align_corners=False), align_corners=False)
    assert torch.allclose(augment.affine(x, ops, m), expected, atol=1e-5)


def reference_op(image: torch.Tensor, op: int, strength: torch.Tensor) -> torch.Tensor:
    """One image (1, 3, H, W) through OP_NAMES[op] alone, the way a per-image loop would do it."""
    photometric = list(augment.PHOTOMETRIC_OPS.values())
    if op < len(photometric):
        return photometric[op](image, strength.view(1, 1, 1, 1)).clamp(0, 1)
    return augment.affine(image, torch.tensor([op - len(photometric)]), strength.view(1)).clamp(0, 1)


@pytest.mark.parametrize("size", [5, 29])  # fewer images than ops (empty chunks), and a ragged split
def test_apply_ops_gives_each_image_exactly_the_op_of_its_chunk(size):
    torch.manual_seed(size)
    x = torch.rand(size, 3, 32, 32)
    order, strength = torch.randperm(size), torch.rand(size) * 2 - 1
    out = augment.apply_ops(x, order, strength)
    ops = augment.op_per_image(order)
    for op, chunk in enumerate(order.tensor_split(len(augment.OP_NAMES))):  # the suggested chunking, independently
        assert (ops[chunk] == op).all()
    assert torch.bincount(ops, minlength=len(augment.OP_NAMES)).tolist() == augment.op_chunk_sizes(size)
    position = order.argsort()  # where each image sits in the shuffled batch
    for i in range(size):
        expected = reference_op(x[i:i + 1], ops[i].item(), strength[position[i]])
        assert torch.allclose(out[i:i + 1], expected, atol=1e-5), f"image {i} ({augment.OP_NAMES[ops[i]]})"


def test_op_assignment_is_random_per_image_and_fixed_in_count():
    size = 26  # two images per op
    assignments = []
    for seed in range(300):
        torch.manual_seed(seed)
        order, strength = augment.sample_op_assignment(size, 0.7, torch.device("cpu"))
        assert torch.equal(order.sort().values, torch.arange(size))
        assert strength.abs().max() <= 0.7 and (strength < 0).any() and (strength > 0).any()
        assignments.append(augment.op_per_image(order))
    assignments = torch.stack(assignments)  # (seeds, images)
    assert len({tuple(row.tolist()) for row in assignments}) == 300, "different seeds repeated an op assignment"
    for image_ops in assignments.T:  # every image sees every op across batches
        assert set(image_ops.tolist()) == set(range(len(augment.OP_NAMES)))
    assert (torch.stack([torch.bincount(row, minlength=13) for row in assignments]) == 2).all()


def test_trivial_augment_applies_the_sampled_ops_and_differs_per_sample():
    size = 26
    x = torch.rand(1, 3, 32, 32).expand(size, -1, -1, -1).contiguous()
    torch.manual_seed(3)
    out = augment.trivial_augment(x, 1.0)
    torch.manual_seed(3)
    order, strength = augment.sample_op_assignment(size, 1.0, x.device)
    assert torch.equal(out, augment.apply_ops(x, order, strength))
    ops = augment.op_per_image(order)
    unchanged = (out == x).flatten(1).all(1)
    assert torch.equal(unchanged, ops == augment.OP_NAMES.index("identity")), "only identity images come back unchanged"
    # Copies that get an op with a continuous strength differ (autocontrast has none, posterize 5 levels).
    discrete = ("identity", "autocontrast", "posterize")
    continuous = [index for index, name in enumerate(augment.OP_NAMES) if name not in discrete]
    flat = out[torch.isin(ops, torch.tensor(continuous))].flatten(1)
    assert flat.shape[0] == 20
    distances = torch.cdist(flat, flat) + torch.eye(flat.shape[0]) * 1e9
    assert distances.min() > 1e-3, "two copies of one image got the same augmentation"


def erased_box(changed: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the one rectangle that `changed` (H, W) bool marks; fails if it is not one rectangle."""
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert len(rows) > 0, "no pixel was erased"
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all() and box.sum() == changed.sum(), "erased pixels do not form one rectangle"
    return box.shape[0], box.shape[1]


@pytest.mark.parametrize("fill", ["noise", "zeros"])
def test_random_erasing_probability_zero_and_one(fill):
    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32) + 5.0  # normalised-looking values, none of them 0
    assert torch.equal(augment.random_erasing(x, 0.0, fill=fill), x)  # bit for bit, either fill
    out = augment.random_erasing(x, 1.0, fill=fill)
    changed = out != x  # (B, 3, H, W); outside the rectangle every pixel is untouched
    assert torch.equal(changed[:, 0], changed[:, 1]) and torch.equal(changed[:, 0], changed[:, 2])
    if fill == "zeros":
        assert (out[changed] == 0).all()
    sizes = [erased_box(mask) for mask in changed[:, 0]]  # exactly one rectangle in every image
    for height, width in sizes:
        # 2%-33% of the area and aspect 0.3-3.3 requested; whole-pixel rounding and clipping widen that a little.
        assert 0.015 * 1024 <= height * width <= 0.36 * 1024, (height, width)
        assert 0.2 <= height / width <= 5.0, (height, width)
    assert len(set(sizes)) > 30, "rectangle sizes should vary per image"
    half = augment.random_erasing(x, 0.5, fill=fill) != x
    assert 40 <= half.flatten(1).any(1).sum() <= 88  # Binomial(128, 0.5): mean 64, sd 5.7


def test_random_erasing_in_the_pipeline_only_adds_one_rectangle():
    images, labels = batch(32)
    plain, _ = GpuAugment(OFF, 10)(images, labels)
    erased, _ = GpuAugment(only(random_erasing=1.0), 10)(images, labels)
    for mask in (erased != plain).any(1):
        erased_box(mask)


def test_whole_pipeline_traces_as_one_graph_without_host_sync():
    # fullgraph=True fails on any graph break: .item(), .tolist(), Python branching on tensor values, or ops whose
    # output shape depends on data (nonzero, masked_select). Those would stall the GPU every step.
    import torch._dynamo
    config = dataclasses.replace(AugmentConfig(), mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.7,
                                 random_erasing=0.25, label_smoothing=0.1)
    augmenter = GpuAugment(config, 10)
    images, labels = batch(32)
    torch._dynamo.reset()
    compiled = torch.compile(augmenter.__call__, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    traced = compiled(images, labels)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(traced, augmenter(images, labels)))
    torch._dynamo.reset()


def test_label_smoothing_values():
    targets = one_hot_smooth(torch.tensor([2, 0]), 10, smoothing=0.1)
    assert targets[0, 2] == pytest.approx(0.91) and targets[0, 0] == pytest.approx(0.01)
    assert targets[1, 0] == pytest.approx(0.91) and torch.allclose(targets.sum(1), torch.ones(2))
    mixed = mix_targets(torch.tensor([1]), torch.tensor([3]), 0.3, 4, smoothing=0.0)
    assert torch.allclose(mixed, torch.tensor([[0.0, 0.3, 0.0, 0.7]]))


def test_mixup_is_a_convex_mix_of_two_samples():
    x = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8)  # neighbours always differ
    torch.manual_seed(1)
    images, targets = mix_batch(x, labels, 10, mixup_alpha=0.8, cutmix_alpha=0.0)
    partner = labels.roll(1)
    lam = targets[0, labels[0]]
    assert 0 < lam < 1
    for i in range(8):
        assert set(targets[i].nonzero().flatten().tolist()) == {labels[i].item(), partner[i].item()}
        assert targets[i, labels[i]] == pytest.approx(lam.item()) and targets[i].sum() == pytest.approx(1.0)
    assert torch.allclose(images, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_match_the_pasted_area(seed):
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 32, 32)  # image i is filled with the value i
    labels = torch.arange(8)
    torch.manual_seed(seed)
    images, targets = mix_batch(x, labels, 10, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.1)
    from_partner = images == x.roll(1, 0)
    assert ((images == x) | from_partner).all()
    partner_area = from_partner[:, 0].flatten(1).float().mean(1)  # the same box for the whole batch
    smoothed_own = targets[torch.arange(8), labels]
    lam = (smoothed_own - 0.01) / 0.9  # undo the smoothing
    assert torch.allclose(lam, 1 - partner_area, atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(8))


def test_both_methods_and_mix_switches():
    x, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    kinds = set()
    for seed in range(12):
        torch.manual_seed(seed)
        images, _ = mix_batch(x, labels, 10, mixup_alpha=0.8, cutmix_alpha=1.0)
        pure = ((images == x) | (images == x.roll(1, 0))).all()
        kinds.add("cutmix" if pure else "mixup")
    assert kinds == {"cutmix", "mixup"}
    images, labels = batch()
    mixing = GpuAugment(only(mixup_alpha=0.8, mix_prob=1.0), 10)
    _, targets = mixing(images, labels, mix=False)
    assert torch.equal(targets, one_hot_smooth(labels, 10))
    assert not GpuAugment(only(mixup_alpha=0.8, mix_prob=0.0), 10).mixes


def test_same_seed_same_augmentation():
    images, labels = batch()
    augmenter = GpuAugment(AugmentConfig(), 10)
    torch.manual_seed(7)
    first = augmenter(images, labels)
    state = torch.get_rng_state()
    second = augmenter(images, labels)
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(first, augmenter(images, labels)))
    torch.set_rng_state(state)  # restoring a checkpointed RNG state replays the next batch
    assert all(torch.equal(a, b) for a, b in zip(second, augmenter(images, labels)))
    assert not torch.equal(first[0], second[0])


def test_everything_disabled_is_plain_normalisation():
    images, labels = batch()
    x, targets = GpuAugment(OFF, 10)(images, labels)
    assert torch.equal(x, normalize(images))
    assert torch.equal(targets, F.one_hot(labels, 10).float())
    from torchvision.transforms.functional import normalize as reference
    expected = reference(images.float() / 255, list(augment.CIFAR10_MEAN), list(augment.CIFAR10_STD))
    assert torch.allclose(x, expected, atol=1e-6)


def test_bad_inputs_are_explained():
    images, labels = batch()
    with pytest.raises(AssertionError, match="uint8"):
        GpuAugment(OFF, 10)(images.float(), labels)
    with pytest.raises(AssertionError, match="labels"):
        GpuAugment(OFF, 10)(images, labels[:3])
    # ranges are checked once, when the config is built (not again by GpuAugment)
    with pytest.raises(ValueError, match="MIX_PROB=1.5 must be at most 1"):
        build_config("smoke", mix_prob=1.5)
