"""Headless training: `python -m nbhelpers.vit --preset fast --data DIR --out DIR [--epochs N ...]`.

Runs the same `fit` as the notebook; on several GPUs `torchrun --nproc_per_node=N -m nbhelpers.vit ...` (DDP).
Exit codes: 0 finished (or stopped as asked), 2 bad input (including a locked or full OUT_DIR), 1 training
diverged or other errors, 130 / 143 stopped by SIGINT / SIGTERM after saving last.pt.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import sys
from typing import Callable, TextIO

from nbhelpers import distributed
from nbhelpers.platform import DiskFullError, RunLockedError, StopRequested
from nbhelpers.vit.checkpoint import CheckpointError
from nbhelpers.vit.config import PRESETS, build_config, read_config_file
from nbhelpers.vit.state import results_saved_line
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


def cli_wording(parser: argparse.ArgumentParser) -> Callable[[str], str]:
    """A rewrite of the notebook's parameter names in a message as this CLI's flags: FRESH=True -> --fresh, LR -> --lr."""
    flags = {action.dest.upper(): action for action in parser._actions if action.option_strings}
    sections = build_config("smoke").to_dict()
    fields = {name.upper() for section in ("model", "augment", "train") for name in sections[section]}
    names = "|".join(sorted(map(re.escape, set(flags) | fields), key=len, reverse=True))
    pattern = re.compile(rf"\b({names})\b(?:=('[^']*'|[^\s,;:)]+?)(?=[\s,;:)]|\.(?:\s|$)|$))?")

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        action = flags.get(name)
        if action is None:
            return f"--set {name.lower()}" + (f"={value}" if value is not None else "")
        if action.nargs == 0:  # a switch: FRESH=True -> --fresh
            return action.option_strings[0]
        return action.option_strings[0] + (f" {value}" if value is not None else "")

    def rewrite(message: str) -> str:
        flagged = pattern.sub(flag, message)
        return re.sub(r"\b([Ss])et (--)", lambda match: ("P" if match.group(1) == "S" else "p") + "ass " + match.group(2), flagged)

    return rewrite


class FlagWording(io.TextIOBase):
    """A text stream that writes through `rewrite`: everything fit() prints reaches the CLI user in flag names."""

    def __init__(self, stream: TextIO, rewrite: Callable[[str], str]):
        super().__init__()
        self.stream, self.rewrite = stream, rewrite

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.stream.write(self.rewrite(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rewrite = cli_wording(parser)
    with contextlib.redirect_stdout(FlagWording(sys.stdout, rewrite)):
        return run(args, rewrite)


def run(args: argparse.Namespace, rewrite: Callable[[str], str]) -> int:
    """Build the config and train; every refusal is one line on stderr in flag names, with the exit code for it."""
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
        if main_process:  # printed before the teardown: the launcher trusts the results after this line
            print(results_saved_line(result), flush=True)
        distributed.shutdown()
    except (ValueError, FileNotFoundError, PermissionError, CheckpointError, RunLockedError, DiskFullError) as error:
        print(f"error: {rewrite(str(error))}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training diverged; the message says which checkpoint is kept
        print(f"error: {rewrite(str(error))}", file=sys.stderr)
        return 1
    except StopRequested as stop:  # last.pt was saved and "stopped at step N" printed
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
