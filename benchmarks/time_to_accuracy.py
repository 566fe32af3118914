"""Seconds of training until a preset's test accuracy first reaches a target, with the accuracy curve.

    python benchmarks/time_to_accuracy.py --data PATH --preset fast --target 0.905 [--out DIR] [--epochs N]
    python benchmarks/time_to_accuracy.py --smoke     # the `smoke` preset on synthetic data, CPU, seconds (run by the tests)

Runs the preset through nbhelpers.vit.train.fit, as the notebook and `python -m nbhelpers.vit` do. As airbench does,
one-time costs are measured and reported apart from the training time: decoding the data set (into OUT/run/cache;
a rerun reads that cache and says so) and a warm-up `fit` of one epoch in OUT/warmup, which fills torch.compile's
caches for the timed run (in one process a second model instance reuses the compiled graph: checked with inductor
on the CPU). Any compile cost left in the timed run stays in its first epoch, reported as `first_epoch_excess_seconds`.
Reusing --out moves the previous run's checkpoints aside (FRESH), as `python -m nbhelpers.vit --fresh` does.

Prints JSON lines: "data_decode", "warmup", one "curve" line per epoch, then "summary". Training seconds are the
sum of fit's `epoch_seconds` (training steps only: no data loading, no evaluation). The curve's `accuracy` is the
test accuracy of the weights the run reports (the EMA weights when the preset keeps an EMA, else the raw weights),
evaluated at the end of each epoch without TTA: no epoch or checkpoint is chosen by test accuracy. The target is
reached at the first epoch whose `accuracy` >= target; failing that, if the run's final figure (EMA + flip TTA as
run_summary.json reports it) reaches the target, at the end of training; otherwise never (seconds_to_target null).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_target, emit, environment, positive_int  # noqa: E402
from nbhelpers.platform import resolve_paths, select_runtime  # noqa: E402
from nbhelpers.vit.config import PRESETS, Config, build_config  # noqa: E402
from nbhelpers.vit.data import CACHE_NAME, load_data  # noqa: E402
from nbhelpers.vit.train import fit  # noqa: E402

SMOKE_OVERRIDES = {"device": "cpu", "epochs": 3, "synthetic_train_size": 1000, "synthetic_test_size": 300}

# ----------------------------------------------------------------------------- the measurement


def run_config(args: argparse.Namespace, out_dir: Path) -> Config:
    """The preset (or `smoke` on synthetic data) writing to `out_dir`, started fresh, without plots."""
    overrides: dict[str, Any] = dict(SMOKE_OVERRIDES) if args.smoke else {"data_root": args.data, "dataset": "cifar10"}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.device is not None and not args.smoke:
        overrides["device"] = args.device
    return build_config("smoke" if args.smoke else args.preset, out_dir=str(out_dir), fresh=True, report_plots=False, **overrides)


def decode_data(config: Config) -> dict[str, Any]:
    """Load the data set once into the run's cache, timed; fit then reads the decoded arrays from there."""
    paths = resolve_paths("q1_vit", config.train.data_root, config.train.out_dir)
    cache = paths.out_dir / "cache"
    was_cached = (cache / CACHE_NAME).is_file()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only JSON lines
        data = load_data(config.train, paths.data_root, cache)
    return {"measurement": "data_decode", "seconds": round(time.perf_counter() - start, 3), "source": data.source,
            "cache_existed": was_cached, "train_images": int(len(data.train_labels)), "test_images": int(len(data.test_labels))}


def share_cache(source_dir: Path, target_dir: Path) -> None:
    """Give the warm-up run the decoded arrays too (a hard link where possible, else a copy)."""
    source = source_dir / "cache" / CACHE_NAME
    if not source.is_file():  # the synthetic set is generated, not cached
        return
    target = target_dir / "cache" / CACHE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def warm_up(config: Config, warm_dir: Path) -> dict[str, Any]:
    """One epoch of the same config in its own folder: compiles the model and fills the inductor cache."""
    warm = copy.deepcopy(config)
    warm.train.out_dir, warm.train.stop_after_epochs = str(warm_dir), 1
    runtime = select_runtime(warm.train.device, warm.train.precision, warm.train.compile, verbose=False)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        result = fit(warm)
    for name in ("last.pt", "best.pt"):  # written by this warm-up just now and never resumed: free the disk
        (warm_dir / name).unlink(missing_ok=True)
    return {"measurement": "warmup", "seconds": round(time.perf_counter() - start, 3), "epochs": len(result.history),
            "epoch_seconds": round(result.history[0]["epoch_seconds"], 3), "compile": runtime.compile, "runtime": runtime.description}


def accuracy_key(config: Config) -> tuple[str, str]:
    """(history key, description) of the per-epoch accuracy of the weights the run reports."""
    if config.train.ema_decay > 0:
        return "ema_test_accuracy", "test accuracy of the EMA weights at the end of the epoch, no TTA"
    return "test_accuracy", "test accuracy of the weights at the end of the epoch, no TTA"


def accuracy_curve(history: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per epoch: cumulative training seconds and the test accuracies fit measured."""
    curve, elapsed = [], 0.0
    for record in history:
        elapsed += record["epoch_seconds"]
        point = {"epoch": record["epoch"], "train_seconds": round(elapsed, 3), "epoch_seconds": round(record["epoch_seconds"], 3),
                 "accuracy": record[key], "test_accuracy": record["test_accuracy"]}
        if "ema_test_accuracy" in record:
            point["ema_test_accuracy"] = record["ema_test_accuracy"]
        curve.append(point)
    return curve


def time_to_target(curve: list[dict[str, Any]], target: float, final_accuracy: float) -> dict[str, Any]:
    """When the target was first reached: at an epoch's end, at the final evaluation, or never.

    Args:
        curve: from `accuracy_curve`, in epoch order.
        target: accuracy to reach (fraction).
        final_accuracy: the run's reported final figure (EMA + TTA where on), measured after the last epoch.
    Returns:
        {"seconds_to_target", "reached_at_epoch", "reached_by"}; all None when never reached.
    """
    for point in curve:
        if point["accuracy"] >= target:
            return {"seconds_to_target": point["train_seconds"], "reached_at_epoch": point["epoch"], "reached_by": "epoch curve"}
    if curve and final_accuracy >= target:
        return {"seconds_to_target": curve[-1]["train_seconds"], "reached_at_epoch": curve[-1]["epoch"], "reached_by": "final evaluation"}
    return {"seconds_to_target": None, "reached_at_epoch": None, "reached_by": None}


def first_epoch_excess(curve: list[dict[str, Any]]) -> float | None:
    """First epoch's seconds minus the median of the later ones: warm-up cost still inside the timed figure."""
    if len(curve) < 2:
        return None
    return round(curve[0]["epoch_seconds"] - statistics.median(point["epoch_seconds"] for point in curve[1:]), 3)


# ----------------------------------------------------------------------------- command line


def summary_record(result, curve: list[dict[str, Any]], target: float, one_time: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The closing line: time to target, the final figure and every one-time cost, labelled."""
    final = result.summary["final_test_accuracy"]
    reached = time_to_target(curve, target, final["reported"])
    met = reached["seconds_to_target"] is not None
    return {"measurement": "summary", "preset": result.config.preset, "target": target, **reached,
            "target_met": met, "shortfall": 0.0 if met else round(check_target(final["reported"], target)[1], 6),
            "final_test_accuracy": final["reported"], "final_test_accuracy_is": final["reported_is"],
            "final_raw_test_accuracy": final["raw"], "epochs": len(curve),
            "total_train_seconds": curve[-1]["train_seconds"], "first_epoch_excess_seconds": first_epoch_excess(curve),
            "warmup_seconds": one_time["warmup"]["seconds"], "decode_seconds": one_time["data_decode"]["seconds"],
            "train_plus_eval_seconds": round(result.summary["wall_seconds"], 3), "images_per_second": round(result.summary["images_per_second"], 1),
            "note": "final-weights test accuracy per epoch; no epoch is chosen by test accuracy",
            "out_dir": str(result.out_dir)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="DATA_ROOT: folder holding cifar-10-batches-py or train/ test/ ImageFolders")
    parser.add_argument("--preset", default="fast", help=f"one of {sorted(PRESETS)} (--smoke uses 'smoke')")
    parser.add_argument("--target", type=float, default=0.905, help="test accuracy to reach, a fraction (default 0.905)")
    parser.add_argument("--out", help="output folder (default ./outputs/time_to_accuracy/<preset>; --smoke: a temporary one)")
    parser.add_argument("--epochs", type=positive_int, help="override the preset's epochs (the schedule follows)")
    parser.add_argument("--device", help="cuda | cpu | mps (default: auto)")
    parser.add_argument("--smoke", action="store_true", help="smoke preset, synthetic data, CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target {args.target}: give the accuracy as a fraction in (0, 1], e.g. --target 0.905")
    if not args.smoke and not args.data:
        parser.error("--data PATH is required (the folder holding CIFAR-10); or pass --smoke for the synthetic check")
    return args


def run(args: argparse.Namespace, out: Path) -> None:
    """Decode, warm up, train, and print every JSON line."""
    config = run_config(args, out / "run")
    context = {"benchmark": "time_to_accuracy", "preset": config.preset, **environment(select_runtime(config.train.device, verbose=False).device)}
    one_time = {"data_decode": emit(context | decode_data(config))}
    share_cache(out / "run", out / "warmup")
    one_time["warmup"] = emit(context | warm_up(config, out / "warmup"))
    with contextlib.redirect_stdout(sys.stderr):
        result = fit(config)
    key, description = accuracy_key(config)
    curve = accuracy_curve(result.history, key)
    for point in curve:
        emit(context | {"measurement": "curve", **point, "accuracy_is": description})
    emit(context | summary_record(result, curve, args.target, one_time))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; every line on stdout is one JSON object. Returns the exit code (2 = bad input)."""
    args = parse_args(argv)
    temporary = tempfile.mkdtemp(prefix="time_to_accuracy_") if args.smoke and not args.out else None
    if args.smoke:
        torch.set_num_threads(1)  # a busy 2-core CI machine stalls two spinning threads (65 s instead of 10)
    out = Path(args.out or temporary or Path("outputs") / "time_to_accuracy" / args.preset).resolve()
    try:
        run(args, out)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
