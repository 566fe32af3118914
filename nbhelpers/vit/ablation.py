"""Ablation studies: train a list of variants of one configuration at an equal budget and compare them.

A study is a list of variants, each a few overrides of the notebook's configuration:

- `"seed"`: the seed write-up's sequence, scaled to the configured model: its plain recipe with 2 fewer blocks and
  half the LR, then (cumulatively) MixUp/CutMix, 2 more blocks, twice the LR, SPT, 1.5x the width.
- `"recipe"`: the configuration itself, then each of this project's additions that it uses switched off in turn
  (TrivialAugment, MixUp/CutMix, random erasing, label smoothing, DropPath, LayerScale, LSA, SPT); EMA and flip
  TTA change no weights, so their rows come from the reference run's own evaluation, without training.
- a list: the configuration, then one variant per item, either a string `"depth=4"` (several changes joined by
  commas: `"dim=192,heads=3"`) or a dict `{"depth": 4}`. Names are config fields, plus `spt=True/False`,
  `mix=True/False` (MixUp/CutMix on or off) and `mlp_ratio=R` (mlp_dim = R x dim).

Every run gets the same budget: a number of epochs, or a number of minutes (each run then sizes its own LR schedule
to that time). Runs live in `OUT_DIR/ablation/<variant>-<hash>/`, the hash taken from the run's configuration; a
run whose `run_summary.json` holds that same configuration is finished and is not trained again, so a killed study
resumes where it stopped (and a half-trained run resumes from its `last.pt`). On several GPUs the runs go one per
GPU at a time, each a separate process; elsewhere they run one after another in this process.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import torch

from nbhelpers.platform import ensure_writable_dir, resolve_paths, select_runtime
from nbhelpers.vit.config import AugmentConfig, Config, validate, validate_fields
from nbhelpers.vit.launch import fit_in_subprocess, visible_gpus
from nbhelpers.vit.model import VisionTransformer
from nbhelpers.vit.report import data_label, device_label, finish_figure
from nbhelpers.vit.train import fit

STUDIES = ("seed", "recipe")
ALIASES = ("spt", "mix", "mlp_ratio")
# Fields that say how to run, not what to train: they stay out of a run's identity (its folder hash).
RUN_ONLY_FIELDS = ("out_dir", "resume", "fresh", "resume_from", "stop_after_epochs", "report_plots", "log_every", "device")
# The seed write-up's own figures (best epoch on the test set, 100-200 epochs, its GPU), per step of its sequence.
SEED_PUBLISHED = {"baseline": 72.43, "mixup-cutmix": 67.51, "deeper": 68.14, "higher-lr": 78.58, "spt": 79.12, "wider": 82.0}
SEED_PUBLISHED_WHAT = {"baseline": "256x6, 100 epochs", "mixup-cutmix": "100 epochs", "deeper": "depth 8, 100 epochs",
                       "higher-lr": "lr 6e-4, 200 epochs", "spt": "200 epochs", "wider": "384 wide, 200 epochs"}


@dataclass
class Variant:
    """One run of a study: a name, what it changes in words, and the overrides that make its configuration."""

    name: str
    change: str
    overrides: dict[str, Any] = field(default_factory=dict)
    from_reference: str | None = None  # "no_ema" / "no_tta": read from the reference run, nothing trained


@dataclass
class StudyPlan:
    """A checked study, ready to run: one configuration and folder per variant."""

    study: str  # "seed", "recipe" or "custom"
    variants: list[Variant]
    configs: list[Config]
    folders: list[Path]
    budget: str  # in words, e.g. "2 epochs each"
    notes: list[str]  # e.g. additions the configuration does not use (nothing to switch off)
    finished: list[bool]  # per variant: a verified run_summary.json is already there
    estimate_seconds: float  # for the runs still to train (rough: eager training steps, no evaluation)


@dataclass
class RunRow:
    """One variant's measured outcome."""

    name: str
    change: str
    folder: Path
    accuracy: float | None  # final test accuracy as reported (None = the run failed)
    train_seconds: float
    parameters: int
    epochs: int
    status: str  # "trained", "already finished", "from the reference run" or "failed: ..."
    published: float | None = None  # the seed write-up's figure for this step (seed study only)
    baseline: float | None = None  # what this row is compared with, when not the reference's reported accuracy


@dataclass
class StudyResult:
    """What `run_study` measured, with the table, takeaways and chart built from it."""

    plan: StudyPlan
    rows: list[RunRow]
    data: str  # the data set in words (generated data is named so)
    device: str
    test_images: int
    takeaways: list[str]
    chart: Path | None = None


# ----------------------------------------------------------------------------- overrides


def _fields(config: Config) -> dict[str, object]:
    return {item.name: part for part in (config.model, config.augment, config.train) for item in dataclasses.fields(part)}


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as tokenizer=spt


def parse_overrides(item: str | dict[str, Any]) -> dict[str, Any]:
    """One variant's overrides from `"depth=4,spt=False"` or `{"depth": 4, "spt": False}` (names lower-cased).

    Raises:
        ValueError naming the form to use when an item is neither.
    """
    if isinstance(item, dict):
        return {str(name).strip().lower(): value for name, value in item.items()}
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"ABLATION item {item!r}: write a string such as 'depth=4' (several: 'dim=192,heads=3') or a dict such as {{'depth': 4}}.")
    overrides = {}
    for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", item):  # a comma inside a value, as in betas=(0.9,0.99), stays
        name, separator, value = part.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"ABLATION item {item!r}: {part.strip()!r} is not NAME=VALUE; write e.g. 'depth=4' or 'spt=False'.")
        overrides[name.strip().lower()] = _value(value.strip())
    return overrides


def apply_overrides(base: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `base` with `overrides` set and checked (None = keep base's value).

    Args:
        overrides: config field names, or the aliases spt (True: tokenizer 'spt', False: 'patch'), mix (False: no
            MixUp/CutMix, True: alphas 0.8 / 1.0) and mlp_ratio (mlp_dim = ratio x dim).
    Returns:
        The new Config. Unknown names raise ValueError listing the valid ones (and the closest match).
    """
    config = copy.deepcopy(base)
    owners = _fields(config)
    settings = {name.lower(): value for name, value in overrides.items() if value is not None}
    for name in settings:
        if name not in owners and name not in ALIASES:
            hint = difflib.get_close_matches(name, [*owners, *ALIASES], n=1)
            raise ValueError(f"Unknown override {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                             f". Valid names: {', '.join(ALIASES)} and the config fields {', '.join(sorted(owners))}.")
    if "spt" in settings:
        settings.setdefault("tokenizer", "spt" if settings["spt"] else "patch")
    if "mix" in settings:
        on = bool(settings["mix"])
        settings.setdefault("mixup_alpha", AugmentConfig().mixup_alpha if on else 0.0)
        settings.setdefault("cutmix_alpha", AugmentConfig().cutmix_alpha if on else 0.0)
    for name, value in settings.items():
        if name in owners:
            setattr(owners[name], name, tuple(value) if isinstance(value, list) else value)
    if "mlp_ratio" in settings:
        config.model.mlp_dim = max(1, round(float(settings["mlp_ratio"]) * config.model.dim))
    validate_fields(config)
    validate(config)
    return config


# ----------------------------------------------------------------------------- the studies


def _seed_variants(base: Config) -> list[Variant]:
    """The seed write-up's steps, cumulative, at the scale of `base`'s model (see the module docstring)."""
    model, train = base.model, base.train
    depth = max(1, model.depth - 2)
    wide = max(model.heads, round(1.5 * model.dim / model.heads) * model.heads)
    plain = {"tokenizer": "patch", "lsa": False, "layerscale": 0.0, "drop_path": 0.0, "trivial_augment": False, "mixup_alpha": 0.0,
             "cutmix_alpha": 0.0, "random_erasing": 0.0, "label_smoothing": 0.0, "ema_decay": 0.0, "tta": False}
    steps = [
        Variant("baseline", f"plain recipe (crop + flip only), depth {depth}, lr {train.lr / 2:g}", plain | {"depth": depth, "lr": train.lr / 2}),
        Variant("mixup-cutmix", "+ MixUp/CutMix", {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}),
        Variant("deeper", f"depth {depth} -> {depth + 2}", {"depth": depth + 2}),
        Variant("higher-lr", f"lr {train.lr / 2:g} -> {train.lr:g}", {"lr": train.lr}),
        Variant("spt", "patches -> SPT", {"tokenizer": "spt"}),
        Variant("wider", f"width {model.dim} -> {wide}", {"dim": wide, "mlp_dim": round(model.mlp_dim * wide / model.dim)}),
    ]
    cumulative: dict[str, Any] = {}
    for step in steps:  # each step keeps the ones before it
        cumulative = cumulative | step.overrides
        step.overrides = dict(cumulative)
    return steps


RECIPE_ADDITIONS = [  # (name, what is switched off, test on the config, overrides that switch it off)
    ("no-trivialaugment", "TrivialAugment", lambda c: c.augment.trivial_augment, {"trivial_augment": False}),
    ("no-mixup-cutmix", "MixUp/CutMix", lambda c: c.augment.mixup_alpha > 0 or c.augment.cutmix_alpha > 0, {"mix": False}),
    ("no-random-erasing", "random erasing", lambda c: c.augment.random_erasing > 0, {"random_erasing": 0.0}),
    ("no-label-smoothing", "label smoothing", lambda c: c.augment.label_smoothing > 0, {"label_smoothing": 0.0}),
    ("no-droppath", "DropPath", lambda c: c.model.drop_path > 0, {"drop_path": 0.0}),
    ("no-layerscale", "LayerScale", lambda c: bool(c.model.layerscale), {"layerscale": 0.0}),
    ("no-lsa", "LSA", lambda c: c.model.lsa, {"lsa": False}),
    ("no-spt", "SPT (plain patches instead)", lambda c: c.model.tokenizer == "spt", {"tokenizer": "patch"}),
]


def _recipe_variants(base: Config) -> tuple[list[Variant], list[str]]:
    variants = [Variant("reference", "the configuration as set")]
    unused = []
    for name, what, used, overrides in RECIPE_ADDITIONS:
        if used(base):
            variants.append(Variant(name, f"without {what}", overrides))
        else:
            unused.append(what)
    if base.train.ema_decay > 0:
        variants.append(Variant("no-ema", "raw weights instead of the EMA (both without flip TTA)", from_reference="no_ema"))
    if base.train.tta:
        variants.append(Variant("no-tta", "without flip TTA", from_reference="no_tta"))
    notes = [f"Not used by this configuration, so not ablated: {', '.join(unused)}."] if unused else []
    return variants, notes


def study_variants(study: str | list | tuple, base: Config) -> tuple[str, list[Variant], list[str]]:
    """(study name, variants, notes) for ABLATION's value; raises ValueError naming the valid forms."""
    if isinstance(study, str):
        if study not in STUDIES:
            hint = difflib.get_close_matches(study, STUDIES, n=1)
            raise ValueError(f"Unknown ABLATION={study!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") +
                             f". Use None (no study), one of {list(STUDIES)}, or a list of overrides such as ['depth=4', 'spt=False'].")
        if study == "seed":
            return "seed", _seed_variants(base), []
        return ("recipe", *_recipe_variants(base))
    if not isinstance(study, (list, tuple)) or not study:
        raise ValueError(f"ABLATION={study!r}: use None (no study), one of {list(STUDIES)}, or a non-empty list such as ['depth=4', 'spt=False'].")
    variants = [Variant("reference", "the configuration as set")]
    for item in study:
        overrides = parse_overrides(item)
        text = ", ".join(f"{name}={value}" for name, value in overrides.items())
        variants.append(Variant(re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower(), text, overrides))
    return "custom", variants, []


# ----------------------------------------------------------------------------- planning


def run_identity(config: Config) -> dict[str, Any]:
    """The configuration without the fields that only say how to run (JSON types, as run_summary.json holds it)."""
    data = json.loads(json.dumps(config.to_dict()))
    for name in RUN_ONLY_FIELDS:
        data["train"].pop(name, None)
    return data


def finished_summary(folder: Path, config: Config) -> dict[str, Any] | None:
    """The run's run_summary.json when it is complete and belongs to this configuration, else None."""
    try:
        summary = json.loads((folder / "run_summary.json").read_text())
        complete = summary["final_test_accuracy"]["reported"] is not None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    saved = copy.deepcopy(summary.get("config", {}))
    for name in RUN_ONLY_FIELDS:
        saved.get("train", {}).pop(name, None)
    return summary if complete and saved == run_identity(config) else None


def _budgeted(config: Config, folder: Path, epochs: int | None, minutes: float | None) -> Config:
    run = copy.deepcopy(config)
    train = run.train
    train.out_dir, train.resume, train.fresh, train.resume_from, train.stop_after_epochs = str(folder), True, False, None, None
    train.report_plots = False
    train.time_budget_minutes = minutes
    train.epochs = epochs or train.epochs
    validate_fields(run)
    validate(run)
    return run


def _folder(root: Path, name: str, config: Config) -> Path:
    digest = hashlib.sha1(json.dumps(run_identity(config), sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{name}-{digest}"


def seconds_per_step(config: Config, steps: int = 2) -> float:
    """Measured seconds of one eager training step (forward, backward, AdamW) of `config`'s model at its batch size.

    On a CPU the step is timed on up to 32 images and scaled to the batch (time grows about linearly there).
    """
    runtime = select_runtime(config.train.device, config.train.precision, False, verbose=False)
    batch = config.train.batch_size if runtime.is_cuda else min(config.train.batch_size, 32)
    torch.manual_seed(0)
    model = VisionTransformer(config.model).to(runtime.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, config.model.image_size, config.model.image_size, device=runtime.device)
    labels = torch.randint(0, config.model.num_classes, (batch,), device=runtime.device)

    def step() -> None:
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocations, kernel selection
    if runtime.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if runtime.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * config.train.batch_size / batch


def _train_images(config: Config) -> int:
    total = config.train.synthetic_train_size if config.train.dataset == "synthetic" else 50_000
    return max(1, total - config.train.val_size)


def estimate_seconds(config: Config) -> float:
    """Rough training time of one run: its budget in minutes, else epochs x steps x a measured step."""
    if config.train.time_budget_minutes:
        return config.train.time_budget_minutes * 60
    steps = config.train.epochs * max(1, _train_images(config) // config.train.batch_size)
    return steps * seconds_per_step(config)


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def plan_study(study: str | list | tuple, base: Config, epochs: int | None = None, minutes: float | None = None,
               max_minutes: float | None = None, out_dir: str | Path | None = None, parallel: int = 1) -> StudyPlan:
    """Check a study completely before anything trains: names, overrides, folders and the time it will take.

    Args:
        study: ABLATION: 'seed', 'recipe', or a list of overrides (strings 'depth=4' or dicts).
        base: the notebook's configuration.
        epochs: epochs per run (None = base's EPOCHS); ignored when `minutes` is set.
        minutes: training minutes per run (each run sizes its LR schedule to them).
        max_minutes: refuse the study when the runs still to train would take longer (estimated; divided by
            `parallel` runs at once). None = no limit (the estimate is printed).
        out_dir: the study's root folder (None = OUT_DIR/ablation).
    Returns:
        StudyPlan. Raises ValueError (one line naming the fix) for bad input or an estimate over `max_minutes`.
    """
    name, variants, notes = study_variants(study, base)
    root = Path(out_dir) if out_dir is not None else resolve_paths("q1_vit", base.train.data_root, base.train.out_dir).out_dir / "ablation"
    configs, folders = [], []
    for variant in variants:
        try:
            config = apply_overrides(base, variant.overrides)
        except ValueError as error:
            raise ValueError(f"ABLATION variant {variant.name!r}: {error}") from None
        config = _budgeted(config, root, epochs, minutes)
        folder = _folder(root, variant.name, config)
        config.train.out_dir = str(folder)
        configs.append(config)
        folders.append(folder)
    finished = [variant.from_reference is not None or finished_summary(folder, config) is not None
                for variant, folder, config in zip(variants, folders, configs)]
    todo = {str(folder): config for done, folder, config in zip(finished, folders, configs) if not done}
    estimate = sum(estimate_seconds(config) for config in todo.values()) / max(1, min(parallel, len(todo) or 1))
    budget = f"{minutes:g} min of training each" if minutes else f"{configs[0].train.epochs} epoch(s) each"
    plan = StudyPlan(name, variants, configs, folders, budget, notes, finished, estimate)
    if max_minutes is not None and estimate > max_minutes * 60:
        raise ValueError(f"ABLATION={study!r}: {len(todo)} run(s) still to train at {budget}, estimated {_minutes(estimate)}, "
                         f"over TIME_BUDGET_MINUTES={max_minutes:g}. Lower ABLATION_EPOCHS, set ABLATION_MINUTES to "
                         f"{max_minutes / max(1, len(todo)):.1f} or less, or raise TIME_BUDGET_MINUTES.")
    return plan


# ----------------------------------------------------------------------------- running


def _share_data_cache(folder: Path, cache: Path) -> None:
    """Point the run's data cache at the study's, so CIFAR-10 is decoded once for all runs (a copy where links fail)."""
    ensure_writable_dir(cache, "ablation cache")
    link = folder / "cache"
    if not link.exists() and not link.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            link.symlink_to(cache.resolve(), target_is_directory=True)
        except OSError:
            pass  # no links (some Windows setups): the run keeps its own cache


def _train_sequentially(plan: StudyPlan, todo: list[int]) -> dict[int, str]:
    statuses = {}
    for count, index in enumerate(todo, 1):
        print(f"[ablation] run {count}/{len(todo)}: {plan.variants[index].name} ({plan.variants[index].change}) -> {plan.folders[index]}", flush=True)
        try:
            result = fit(plan.configs[index])
            statuses[index] = "trained" if result.status == "finished" else "stopped"
        except FloatingPointError as error:  # a diverged variant is a result; the others still run
            statuses[index] = f"failed: {error}".splitlines()[0]
    return statuses


def _train_in_parallel(plan: StudyPlan, todo: list[int], gpus: list[int | None]) -> dict[int, str]:
    """One run per GPU at a time, each a separate process pinned to its GPU; a free GPU takes the next run."""
    free: Queue = Queue()
    for gpu in gpus:
        free.put(gpu)

    def train(index: int) -> tuple[int, str]:
        gpu = free.get()
        try:
            config = copy.deepcopy(plan.configs[index])
            if config.train.device and config.train.device.startswith("cuda"):
                config.train.device = "cuda"  # the process sees only its own GPU, as cuda:0
            print(f"[ablation] {plan.variants[index].name} on GPU {gpu}: log in {plan.folders[index] / 'train.log'}", flush=True)
            code = fit_in_subprocess(config, gpu, plan.folders[index] / "train.log")
            print(f"[ablation] {plan.variants[index].name} done (exit code {code})", flush=True)
            return index, "trained" if code == 0 else f"failed: exit code {code}, see {plan.folders[index] / 'train.log'}"
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return dict(pool.map(train, todo))


def run_study(study: str | list | tuple | None, base: Config, epochs: int | None = None, minutes: float | None = None,
              max_minutes: float | None = None, num_gpus: int | None = None, processes: int | None = None,
              out_dir: str | Path | None = None, data_name: str | None = None) -> StudyResult | None:
    """Plan (all checks first), train what is not finished, and measure a study.

    Args:
        study: ABLATION (None = no study: returns None).
        base, epochs, minutes, max_minutes, out_dir: as for `plan_study`.
        num_gpus: GPUs to use (None = all visible); with 2 or more, one run per GPU at a time in separate processes.
        processes: force this many parallel processes whatever the GPUs (tests: CPU processes).
        data_name: what to call a real data set in the takeaways (generated data is always named so).
    Returns:
        StudyResult, or None when `study` is None.
    """
    if study is None:
        print("ABLATION=None: no ablation study (set ABLATION='seed', 'recipe' or a list such as ['depth=4', 'spt=False']).")
        return None
    gpus = processes or min(num_gpus if num_gpus is not None else visible_gpus(), visible_gpus())
    plan = plan_study(study, base, epochs, minutes, max_minutes, out_dir, parallel=max(1, gpus))
    todo, seen = [], set()
    for index, done in enumerate(plan.finished):
        if not done and plan.folders[index] not in seen:  # two variants with one configuration train once
            seen.add(plan.folders[index])
            todo.append(index)
    print(f"[ablation] study {plan.study!r}: {len(plan.variants)} variants at {plan.budget}; {len(todo)} to train "
          f"(estimated {_minutes(plan.estimate_seconds)}), {len(plan.variants) - len(todo)} finished or read from the reference run.")
    if todo:
        _share_data_cache(plan.folders[0].parent, plan.folders[0].parent / "cache")
        for index in todo:
            _share_data_cache(plan.folders[index], plan.folders[0].parent / "cache")
    statuses = _train_in_parallel(plan, todo, list(range(gpus))) if gpus >= 2 else _train_sequentially(plan, todo)
    return measure_study(plan, statuses, data_name)


# ----------------------------------------------------------------------------- measuring


def _row(plan: StudyPlan, index: int, statuses: dict[int, str], reference: dict[str, Any] | None) -> RunRow:
    variant, folder = plan.variants[index], plan.folders[index]
    published = SEED_PUBLISHED.get(variant.name) if plan.study == "seed" else None
    if variant.from_reference:
        final = (reference or {}).get("final_test_accuracy", {})
        weights = "ema" if variant.from_reference == "no_tta" and final.get("reported_is", "").startswith("ema") else "raw"
        accuracy = final.get(weights) if reference else None
        # raw against EMA weights, both without flip TTA (the reported accuracy has TTA: its gain is the no-tta row's)
        baseline = final.get("ema") if variant.from_reference == "no_ema" else None
        return RunRow(variant.name, variant.change, plan.folders[0], accuracy, (reference or {}).get("train_seconds", 0.0),
                      (reference or {}).get("parameters", 0), (reference or {}).get("epochs", 0), "from the reference run",
                      baseline=baseline)
    summary = finished_summary(folder, plan.configs[index])
    if summary is None:
        return RunRow(variant.name, variant.change, folder, None, 0.0, 0, 0, statuses.get(index, "not finished"), published)
    return RunRow(variant.name, variant.change, folder, summary["final_test_accuracy"]["reported"], summary["train_seconds"],
                  summary["parameters"], summary["epochs"], statuses.get(index, "already finished"), published)


def measure_study(plan: StudyPlan, statuses: dict[int, str] | None = None, data_name: str | None = None) -> StudyResult:
    """Rows, takeaways and chart from the runs' run_summary.json files (a run not finished gets an empty row)."""
    statuses = statuses or {}
    reference = finished_summary(plan.folders[0], plan.configs[0])
    rows = [_row(plan, index, statuses, reference) for index in range(len(plan.variants))]
    summaries = [s for s in (finished_summary(f, c) for f, c in zip(plan.folders, plan.configs)) if s]
    source = summaries[0]["data_source"] if summaries else "unknown"
    result = StudyResult(plan, rows, data_label(source, data_name), device_label(summaries[0]["device"]) if summaries else "unknown",
                         summaries[0]["test_images"] if summaries else 0, [])
    result.takeaways = takeaways(result)
    return result


def _delta_base(result: StudyResult, index: int) -> int:
    """The row a variant is compared with: the previous step in the seed study, the reference otherwise."""
    return index - 1 if result.plan.study == "seed" else 0


def takeaways(result: StudyResult) -> list[str]:
    """Sentences built from the measured accuracies (in points = percentage points of test accuracy)."""
    rows, plan = result.rows, result.plan
    where = "on generated data (not CIFAR-10)" if result.data.startswith("generated") else f"on {result.data.split(' (')[0]}"
    sentences = []
    for index in range(1, len(rows)):
        row, other = rows[index], rows[_delta_base(result, index)]
        if row.baseline is not None:
            other = dataclasses.replace(other, accuracy=row.baseline)
        if row.accuracy is None or other.accuracy is None:
            sentences.append(f"{row.change}: no result yet ({row.status}).")
            continue
        delta = 100 * (row.accuracy - other.accuracy)
        if plan.study == "recipe":  # the reference has the addition: its gain is reference minus variant
            what = row.change.removeprefix("without ").removeprefix("raw weights instead of the ")
            sentence = (f"{what}: {-delta:+.1f} points ({100 * other.accuracy:.1f}% with it, {100 * row.accuracy:.1f}% without)")
        else:
            against = "the previous step" if plan.study == "seed" else "the reference"
            sentence = f"{row.change}: {delta:+.1f} points over {against} ({100 * other.accuracy:.1f}% -> {100 * row.accuracy:.1f}%)"
        sentence += f", {where}, at equal budget ({plan.budget})"
        if row.published is not None and rows[index - 1].published is not None:
            sentence += f"; the seed write-up saw {row.published - rows[index - 1].published:+.1f} (its best epochs, its GPU)"
        sentences.append(sentence + ".")
    measured = [row for row in rows if row.accuracy is not None]
    if measured:
        best = max(measured, key=lambda row: row.accuracy)
        sentences.append(f"Most accurate: {best.name} at {100 * best.accuracy:.1f}% ({_minutes(best.train_seconds)} of training).")
    if result.test_images:
        accuracy = float(np.mean([row.accuracy for row in measured])) if measured else 0.5
        noise = 100 * 2 * math.sqrt(2 * accuracy * (1 - accuracy) / result.test_images)
        sentences.append(f"One run per variant: with {result.test_images:,} test images, differences under about {noise:.1f} points "
                         "are within the test set's sampling noise alone (two standard errors of a difference).")
    return sentences


def study_table(result: StudyResult) -> str:
    """Markdown table of the study; the seed study also shows the write-up's own figures, labelled as theirs."""
    seed = result.plan.study == "seed"
    header = "| variant | change | params | epochs | train time | final test accuracy | vs " + ("previous step" if seed else "reference") + " |"
    header += " seed write-up (theirs: best epoch, their GPU) |" if seed else ""
    lines = [f"Study `{result.plan.study}` on {result.data}, {result.device}; equal budget: {result.plan.budget}.", "",
             header, "| --- " * (header.count("|") - 1) + "|"]
    for index, row in enumerate(result.rows):
        other = result.rows[_delta_base(result, index)]
        delta = f"{100 * (row.accuracy - other.accuracy):+.1f}" if index and row.accuracy is not None and other.accuracy is not None else ""
        accuracy = f"{100 * row.accuracy:.2f}%" if row.accuracy is not None else row.status
        line = (f"| {row.name} | {row.change} | {row.parameters / 1e6:.2f} M | {row.epochs} | {_minutes(row.train_seconds)} | "
                f"{accuracy} | {delta} |")
        if seed:
            line += f" {row.published:.2f}% ({SEED_PUBLISHED_WHAT[row.name]}) |" if row.published is not None else " |"
        lines.append(line)
    lines += [""] + [f"*{note}*" for note in result.plan.notes]
    return "\n".join(lines)


def plot_study(result: StudyResult, show: bool = True) -> Path | None:
    """Accuracy per variant and accuracy against training time, saved as OUT_DIR/ablation/<study>.png."""
    import matplotlib.pyplot as plt

    rows = [row for row in result.rows if row.accuracy is not None]
    if not rows:
        return None
    figure, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4))
    names = [row.name for row in rows]
    accuracies = [100 * row.accuracy for row in rows]
    bars.bar(range(len(rows)), accuracies, color="tab:blue")
    bars.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    bars.set_ylabel("final test accuracy (%)")
    bars.set_ylim(max(0.0, min(accuracies) - 10), min(100.0, max(accuracies) + 5))
    for position, value in enumerate(accuracies):
        bars.text(position, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    minutes = [row.train_seconds / 60 for row in rows]
    scatter.scatter(minutes, accuracies, color="tab:orange")
    for name, x, y in zip(names, minutes, accuracies):
        scatter.annotate(name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    scatter.set_xlabel("training time (min)")
    scatter.set_ylabel("final test accuracy (%)")
    for axis in (bars, scatter):
        axis.grid(alpha=0.3)
    figure.suptitle(f"ablation '{result.plan.study}' on {result.data}; {result.plan.budget}")
    result.chart = finish_figure(figure, result.plan.folders[0].parent / f"{result.plan.study}.png", show)
    return result.chart


def show_study(result: StudyResult | None) -> None:
    """Notebook cell: the study's table, charts and takeaways (nothing when ABLATION is None)."""
    if result is None:
        return
    from IPython.display import Markdown, display

    display(Markdown(study_table(result)))
    plot_study(result, show=True)
    display(Markdown("**Takeaways** (computed from the runs above)\n\n" + "\n".join(f"- {line}" for line in result.takeaways)))
