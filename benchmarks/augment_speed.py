"""Time nbhelpers.vit.augment (full pipeline and each op) on one uint8 batch, next to kornia when installed.

    python benchmarks/augment_speed.py --device cpu --batch 512
    python benchmarks/augment_speed.py --device cuda --batch 512 --repeats 50

kornia is not a project dependency: install it only to run the comparison. Prints a Markdown table
with the median and the best of --repeats calls (the best is the steadier number on a shared machine).
kornia ops get float [0, 1] input (what they require); ours get what the pipeline passes them.
Note: kornia's auto.TrivialAugment draws ONE op per batch; ours draws one op per image and runs each op
only on its own images (fixed-size chunks of a random permutation), so both do about one op of work.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from nbhelpers.vit import augment  # noqa: E402
from nbhelpers.vit.config import AugmentConfig  # noqa: E402


def time_ms(function: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """(median, best) wall time of one call in milliseconds (CUDA synchronised around each call)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), min(samples)


def our_ops(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], object]]:
    unit = images.float() / 255
    normalised = augment.normalize(images)
    batch = images.shape[0]
    magnitude = (torch.rand(batch, 1, 1, 1, device=images.device) * 2 - 1)
    geometric = torch.randint(len(augment.GEOMETRIC_OPS), (batch,), device=images.device)
    full = augment.GpuAugment(AugmentConfig(), 10)
    ops: dict[str, Callable[[], object]] = {
        "full pipeline (default AugmentConfig)": lambda: full(images, labels),
        "full pipeline, mix=False": lambda: full(images, labels, mix=False),
        "normalize (uint8 -> float)": lambda: augment.normalize(images),
        "crop (pad 4, reflect) + flip": lambda: augment.random_crop_flip(images, 4, True),
        "trivial_augment (one op per image)": lambda: augment.trivial_augment(unit, 1.0),
        "affine (rotate/shear/translate)": lambda: augment.affine(unit, geometric, magnitude.view(-1)),
        "random_erasing p=0.25": lambda: augment.random_erasing(normalised, 0.25),
        "random_erasing p=0.25, zeros fill": lambda: augment.random_erasing(normalised, 0.25, fill="zeros"),
        "mix_batch (MixUp or CutMix)": lambda: augment.mix_batch(normalised, labels, 10, 0.8, 1.0, 1.0, 0.1),
    }
    for name, function in augment.PHOTOMETRIC_OPS.items():
        if name != "identity":
            ops[f"  {name}"] = (lambda f: lambda: f(unit, magnitude))(function)
    return ops


def kornia_ops(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], object]]:
    import kornia.augmentation as K

    unit = images.float() / 255
    device = images.device

    def build(module: torch.nn.Module) -> Callable[[], object]:
        module = module.to(device)
        return lambda: module(unit)

    mean, std = torch.tensor(augment.CIFAR10_MEAN), torch.tensor(augment.CIFAR10_STD)
    ops = {
        "normalize (uint8 -> float)": lambda: K.Normalize(mean, std)(images.float() / 255),
        "crop (pad 4, reflect) + flip": build(torch.nn.Sequential(
            K.RandomCrop((32, 32), padding=4, padding_mode="reflect"), K.RandomHorizontalFlip())),
        "trivial_augment (one op per image)": build(K.auto.TrivialAugment()),
        "affine (rotate/shear/translate)": build(K.RandomAffine(degrees=30, translate=(0.3, 0.3), shear=17, p=1.0)),
        "random_erasing p=0.25, zeros fill": build(K.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3))),
        "  brightness": build(K.ColorJitter(brightness=0.9, p=1.0)),
        "  contrast": build(K.ColorJitter(contrast=0.9, p=1.0)),
        "  saturation": build(K.ColorJitter(saturation=0.9, p=1.0)),
        "  sharpness": build(K.RandomSharpness(sharpness=0.9, p=1.0)),
        "  posterize": build(K.RandomPosterize(bits=(4, 8), p=1.0)),
        "  solarize": build(K.RandomSolarize(thresholds=0.5, additions=0.0, p=1.0)),
        "  autocontrast": build(K.RandomAutoContrast(p=1.0)) if hasattr(K, "RandomAutoContrast") else None,
    }
    mixup, cutmix = K.RandomMixUpV2(p=1.0).to(device), K.RandomCutMixV2(p=1.0, use_correct_lambda=True).to(device)
    ops["mix_batch (MixUp or CutMix)"] = lambda: (mixup(unit, labels), cutmix(unit, labels))
    pipeline = K.AugmentationSequential(
        K.RandomCrop((32, 32), padding=4, padding_mode="reflect"), K.RandomHorizontalFlip(),
        K.auto.TrivialAugment(), K.Normalize(mean, std), K.RandomErasing(p=0.25),
    ).to(device)
    ops["full pipeline, mix=False"] = lambda: pipeline(images.float() / 255)
    return {name: function for name, function in ops.items() if function is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 | mps")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-kornia", action="store_true", help="skip the kornia comparison")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    ours = our_ops(images, labels)
    theirs: dict[str, Callable[[], object]] = {}
    kornia_version = "not installed"
    if not args.no_kornia:
        try:
            import kornia
            kornia_version = kornia.__version__
            theirs = kornia_ops(images, labels)
        except ImportError:
            pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | kornia {kornia_version} | batch {args.batch} x 3 x 32 x 32 uint8 | median of {args.repeats}")
    print("\n| op | ours median / best (ms) | kornia median / best (ms) | faster (best) |\n|---|---:|---:|---|")
    for op, function in ours.items():
        mine = time_ms(function, device, args.repeats)
        other = time_ms(theirs[op], device, args.repeats) if op in theirs else None
        verdict = "" if other is None else ("ours" if mine[1] <= other[1] else "kornia")
        kornia_cell = "-" if other is None else f"{other[0]:.2f} / {other[1]:.2f}"
        print(f"| {op} | {mine[0]:.2f} / {mine[1]:.2f} | {kornia_cell} | {verdict} |")


if __name__ == "__main__":
    main()
