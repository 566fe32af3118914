"""Compare candidate recipes for the `fast` / `best` presets on a validation split (never the test set).

    python benchmarks/tune_presets.py --data DATA_ROOT --candidates fast,cct_fast,cct_fast_light --epochs 20
    python benchmarks/tune_presets.py --smoke          # tiny models, synthetic data, CPU (the test suite runs this)

Each candidate is a preset plus overrides (CANDIDATES below). It trains on 45,000 images with 5,000 held out
(`val_size`), and prints one JSON line: training seconds (no data decoding, no evaluation), the final raw and
EMA validation accuracy, and images/s. Pick by validation accuracy per second of training; then measure the chosen
recipe once on the test split with time_to_accuracy.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, positive_int  # noqa: E402

from nbhelpers.vit.config import build_config  # noqa: E402

# name -> (preset, overrides). Conv-tokenizer candidates follow CCT (Hassani et al., 2021): a conv stem instead of
# patches and sequence pooling; the "light" ones drop MixUp/CutMix/TrivialAugment, which short schedules rarely repay.
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    "fast": ("fast", {}),
    "cct_fast": ("fast", {"tokenizer": "conv", "conv_layers": 2, "pool": "seqpool", "dim": 256, "heads": 4,
                          "mlp_dim": 512, "depth": 7}),
    "cct_fast_light": ("fast", {"tokenizer": "conv", "conv_layers": 2, "pool": "seqpool", "dim": 256, "heads": 4,
                                "mlp_dim": 512, "depth": 7, "trivial_augment": False, "mixup_alpha": 0.0,
                                "cutmix_alpha": 0.0, "random_erasing": 0.0}),
    "spt_lsa_fast": ("fast", {"tokenizer": "spt", "lsa": True}),
    "best": ("best", {}),
    "cct_best": ("best", {"tokenizer": "conv", "conv_layers": 1, "pool": "seqpool", "dim": 256, "heads": 4,
                          "mlp_dim": 512, "depth": 7, "lsa": False}),
}
SMOKE_MODEL = {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="DATA_ROOT with cifar-10-batches-py or train/ test/ ImageFolders")
    parser.add_argument("--candidates", default="fast,cct_fast,cct_fast_light", help=f"comma-separated, from {list(CANDIDATES)}")
    parser.add_argument("--epochs", type=positive_int, help="override every candidate's epochs (the schedule follows)")
    parser.add_argument("--val-size", type=positive_int, default=5000, help="training images held out for validation")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--device", help="cuda | cpu | mps (default: auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on synthetic data on the CPU")
    args = parser.parse_args(argv)
    unknown = [name for name in args.candidates.split(",") if name not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    if not args.smoke and not args.data:
        parser.error("--data is required (or --smoke)")
    return args


def candidate_config(name: str, args: argparse.Namespace, out_dir: Path):
    """The candidate's Config with the validation split, output folder and smoke settings applied."""
    preset, overrides = CANDIDATES[name]
    settings = dict(overrides, val_size=args.val_size, out_dir=str(out_dir / name), data_root=args.data,
                    device=args.device, report_plots=False, fresh=True, epochs=args.epochs)
    if args.smoke:
        settings |= SMOKE_MODEL | {"dataset": "synthetic", "synthetic_train_size": 600, "synthetic_test_size": 100,
                                   "val_size": 100, "batch_size": 64, "epochs": args.epochs or 2, "device": "cpu",
                                   "compile": False}
    return build_config(preset, **settings)


def main(argv: list[str] | None = None) -> int:
    from nbhelpers.vit.train import fit

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tune_") as temp:
        out_dir = args.out or Path(temp)
        for name in args.candidates.split(","):
            config = candidate_config(name, args, out_dir)
            result = fit(config)
            last = result.history[-1]
            seconds = sum(record["epoch_seconds"] for record in result.history)
            emit({"benchmark": "tune_presets", "candidate": name, "preset": CANDIDATES[name][0],
                  "overrides": CANDIDATES[name][1], "epochs": len(result.history), "train_seconds": round(seconds, 2),
                  "val_accuracy": last.get("val_accuracy"), "ema_val_accuracy": last.get("ema_val_accuracy"),
                  "images_per_second": round(sum(r["images_per_second"] for r in result.history) / len(result.history), 1),
                  "device": result.summary.get("device"), "smoke": args.smoke})
    return 0


if __name__ == "__main__":
    sys.exit(main())
