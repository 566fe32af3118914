"""Headless training: `python -m nbhelpers.vit --preset fast --data DIR --out DIR [--epochs N ...]`.

Runs the same `fit` as the notebook; on several GPUs `torchrun --nproc_per_node=N -m nbhelpers.vit ...` (DDP).
Exit codes: 0 finished (or stopped as asked), 2 bad input, 1 other errors.
"""
from __future__ import annotations

import argparse
import ast
import sys

from nbhelpers import distributed
from nbhelpers.vit.checkpoint import CheckpointError
from nbhelpers.vit.config import PRESETS, build_config, read_config_file
from nbhelpers.vit.train import fit


def parse_value(text: str):
    """'10' -> 10, '1e-3' -> 0.001, 'True' -> True, 'None' -> None, anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbhelpers.vit", description="Train a ViT on CIFAR-10 (same code as q1_vit_cifar10.ipynb).")
    parser.add_argument("--preset", default="fast", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--data", dest="data_root", help="DATA_ROOT: folder holding cifar-10-batches-py or train/ test/ ImageFolders")
    parser.add_argument("--out", dest="out_dir", help="OUT_DIR: checkpoints, run_summary.json, plots")
    parser.add_argument("--dataset", choices=["cifar10", "synthetic"])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--time-budget", dest="time_budget_minutes", type=float, help="minutes: size the run to end within them (wins over --epochs)")
    parser.add_argument("--config-file", help="a config written by nbhelpers.vit.launch (JSON); the other options override it")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--device")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--fresh", action="store_true", default=None, help="move an existing checkpoint aside and start over")
    parser.add_argument("--resume-from", help="a previous run's last.pt or output folder to continue in --out")
    parser.add_argument("--stop-after-epochs", type=int)
    parser.add_argument("--no-plots", dest="report_plots", action="store_false", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any other config field, e.g. --set dim=256")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key not in ("preset", "set", "config_file")}
    try:
        for item in args.set:
            name, separator, value = item.partition("=")
            if not separator:
                raise ValueError(f"--set {item!r}: write NAME=VALUE, e.g. --set dim=256")
            overrides[name.strip()] = parse_value(value.strip())
        config = read_config_file(args.config_file, **overrides) if args.config_file else build_config(args.preset, **overrides)
        result = fit(config)
        main_process = distributed.is_main()
        distributed.shutdown()
    except (ValueError, FileNotFoundError, PermissionError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training diverged; last.pt holds the last good state
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.status == "finished" and main_process:
        print(f"done: {result.out_dir / 'run_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
