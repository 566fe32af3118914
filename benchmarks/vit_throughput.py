"""Training-step throughput, TFLOP/s and MFU of the ViT presets: naive path vs project path vs full loop.

    python benchmarks/vit_throughput.py                        # GPU: seed, fast, best at each preset's batch
    python benchmarks/vit_throughput.py --models seed --batch-size 256
    python benchmarks/vit_throughput.py --smoke                # CPU, tiny models, seconds (run by the tests)

Prints one JSON line per measurement, for each model:
  path "naive":     the seed write-ups' step: fp32 (TF32 off), eager, attention written as softmax(QK^T/sqrt(d))V,
                    torch.optim.AdamW(foreach=False, fused=False) over all parameters.
  path "project":   the project's step: select_runtime's autocast, scaled_dot_product_attention, torch.compile
                    where the runtime allows it, build_optimizer's AdamW (fused on CUDA).
  path "full_loop": one epoch of nbhelpers.vit.train.train_one_epoch on device-resident synthetic uint8 images
                    (the preset's GpuAugment, soft targets, grad clip, LR schedule, EMA, shuffling, host syncs every
                    log_every steps) and its overhead over the project's bare step.
  path "fit":       (with --fit-epochs N) nbhelpers.vit.train.fit end to end on a synthetic data set of --loop-images
                    training images (test set a fifth of that, as CIFAR-10's): data generation, compile, training,
                    the evaluation schedule, checkpoints, the final evaluation and run_summary.json (no plots), and its
                    overhead per training image over the project's bare step ("fit_overhead_percent").
then a summary line with the project/naive ratio per model. A bare step is forward, loss, backward and
optimizer step on one fixed pre-normalised batch; --warmup steps (compilation included) are not timed; the
device is synchronised around the --steps timed steps. FLOPs per image come from nbhelpers.vit.report.flops_per_image
counted with the explicit attention (FlopCounterMode does not count SDPA on the CPU); training = 3 x forward.
MFU is against the GPU's dense bf16/fp16 peak (benchmarks/_common.py), for the fp32 naive path too; null off the table.
Targets (stated for an H100, evaluated on CUDA only): seed project step >= 40% MFU and >= 17,500 images/s;
`fast` full loop at most 10% slower per image than its bare step. Where one is missed, "shortfall" says by how much.
The full loop reuses the bare step's compiled graph (same module and shapes; checked with inductor on the CPU).
Expected time on an H100: about 3 minutes, most of it compiling the three models. This is an estimate: the
script has not been run on a GPU yet.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PEAK_BASIS, emit, environment, peak_flops, positive_int, profile_top_ops,  # noqa: E402
                     release_compiled, strict_fp32, target_fields, timed)  # noqa: E402
from nbhelpers.platform import Runtime, select_runtime  # noqa: E402
from nbhelpers.vit.config import Config, build_config  # noqa: E402
from nbhelpers.vit.model import Attention, VisionTransformer  # noqa: E402
from nbhelpers.vit.report import count_parameters, flops_per_image  # noqa: E402
from nbhelpers.vit.state import TrainState  # noqa: E402
from nbhelpers.vit.evaluate import DeviceData  # noqa: E402
from nbhelpers.vit.train import build_state, make_loop, train_one_epoch  # noqa: E402

MODELS = ("seed", "fast", "best")
SEED_TARGETS = {"mfu": 0.40, "images_per_second": 17_500.0}
LOOP_TARGETS = {"loop_overhead_percent": 10.0}
SMOKE_MODEL = {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}  # keeps each preset's tokenizer, LSA, LayerScale

# ----------------------------------------------------------------------------- naive attention


def explicit_attention_forward(attention: Attention, x: Tensor) -> Tensor:
    """The model's Attention computed as softmax(q k^T * scale) v with explicit matmuls (same weights, same result)."""
    B, N, D = x.shape
    q, k, v = attention.split_heads(x)  # (B, heads, N, head_dim); under LSA q already carries the learned scale
    logits = (q @ k.transpose(-2, -1)) * (1.0 if attention.lsa else attention.head_dim ** -0.5)  # (B, heads, N, N)
    if attention.lsa:
        logits = logits.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float("-inf"))
    weights = F.dropout(logits.softmax(dim=-1), attention.attn_dropout, attention.training)
    out = weights @ v  # (B, heads, N, head_dim)
    return attention.proj_drop(attention.proj(out.transpose(1, 2).reshape(B, N, D)))


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every Attention module of `model` runs `explicit_attention_forward` instead of SDPA."""
    modules = [module for module in model.modules() if isinstance(module, Attention)]
    assert modules, "explicit_attention: the model has no nbhelpers.vit.model.Attention modules"
    for module in modules:
        module.forward = explicit_attention_forward.__get__(module)  # instance attribute shadows the class method
    try:
        yield model
    finally:
        for module in modules:
            del module.forward


def train_flops_per_image(model: VisionTransformer) -> int:
    """Training FLOPs per image: 3 x the forward FLOPs, attention matmuls included."""
    with explicit_attention(model):
        return 3 * flops_per_image(model, model.config.image_size)


# ----------------------------------------------------------------------------- bare steps


@dataclass
class Settings:
    batch_size: int | None  # None = each preset's batch size
    warmup: int  # untimed steps before each timed run (compilation happens here)
    steps: int  # timed steps per bare-step path
    loop_images: int  # images in the timed full-loop epoch (rounded down to whole batches)
    smoke: bool
    profile: bool = False
    fit_epochs: int = 0  # epochs of the timed end-to-end fit() run; 0 = skip it  # add torch.profiler's top ops of the project step to its line


def model_config(name: str, settings: Settings, device: torch.device) -> Config:
    """The preset's config (tiny model in smoke mode) with the benchmark's batch size; no mid-epoch checkpoints."""
    config = build_config(name, batch_size=settings.batch_size, device=str(device), **(SMOKE_MODEL if settings.smoke else {}))
    config.train.checkpoint_minutes = math.inf
    return config


def fixed_batch(config: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """One pre-normalised float32 batch (B, 3, S, S) and integer labels (B,), reused by every bare step."""
    generator = torch.Generator().manual_seed(0)
    size, batch = config.model.image_size, config.train.batch_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(config.model.num_classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def bare_step(network: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              autocast: Callable[[], contextlib.AbstractContextManager], batch: tuple[Tensor, Tensor]) -> Callable[[], None]:
    """A closure running forward, cross-entropy, backward and the optimizer step on `batch`."""
    images, labels = batch

    def step() -> None:
        with autocast():
            logits = network(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def time_steps(step: Callable[[], None], settings: Settings, device: torch.device) -> float:
    """Seconds for `settings.steps` calls of `step` after `settings.warmup` untimed ones."""
    for _ in range(settings.warmup):
        step()
    return timed(lambda: [step() for _ in range(settings.steps)], device)[1]


def speed_fields(images: int, seconds: float, train_flops: int, device_label: str) -> dict[str, Any]:
    """images/s, achieved TFLOP/s and MFU (null where the GPU's peak is unknown)."""
    per_second = images / seconds
    # seconds keeps six significant figures: rounded to 0.1 ms, a millisecond-scale smoke timing lost over 1%, and
    # images_per_second no longer matched images / seconds in the record.
    achieved = per_second * train_flops
    peak = peak_flops(device_label)
    return {"images_per_second": round(per_second, 1), "seconds": float(f"{seconds:.6g}"), "train_flops_per_image": train_flops,
            "tflops": round(achieved / 1e12, 6), "mfu": None if peak is None else round(achieved / peak, 4),
            "peak_flops": peak, "peak_basis": PEAK_BASIS}


def measure_naive(config: Config, settings: Settings, device: torch.device) -> dict[str, Any]:
    """The seed write-ups' path: fp32, eager, explicit attention, unfused AdamW."""
    torch.manual_seed(config.train.seed)
    model = VisionTransformer(config.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, betas=config.train.betas,
                                  weight_decay=config.train.weight_decay, foreach=False, fused=False)
    step = bare_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), contextlib.nullcontext,
                     fixed_batch(config, device))
    with explicit_attention(model), strict_fp32():
        seconds = time_steps(step, settings, device)
    return {"precision": "fp32", "tf32": False, "compile": False, "attention": "explicit softmax(QK^T/sqrt(d))V",
            "optimizer": "AdamW(foreach=False, fused=False)", "steps": settings.steps, "seconds_timed": seconds}


def measure_project(state: TrainState, config: Config, runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """The project's path on the TrainState's model and optimizer: autocast, SDPA, compile, fused AdamW on CUDA."""
    network = torch.compile(state.model) if runtime.compile else state.model
    state.model.train()
    step = bare_step(network, state.optimizer, state.scaler, runtime.autocast, fixed_batch(config, runtime.device))
    seconds = time_steps(step, settings, runtime.device)
    defaults = state.optimizer.defaults
    profile = {"profile": profile_top_ops(step, runtime.device)} if settings.profile else {}
    return profile | {"precision": str(runtime.amp_dtype).replace("torch.", "") if runtime.amp_dtype else "fp32",
            "tf32": torch.backends.cuda.matmul.allow_tf32 if runtime.is_cuda else False, "compile": runtime.compile,
            "attention": "scaled_dot_product_attention",
            "optimizer": f"AdamW(foreach={defaults.get('foreach')}, fused={defaults.get('fused')})", "steps": settings.steps,
            "seconds_timed": seconds}


# ----------------------------------------------------------------------------- full loop


def loop_data(config: Config, images: int, device: torch.device) -> DeviceData:
    """Random uint8 training images (N, 3, S, S) and labels on the device, N a whole number of batches (at least one)."""
    batch, size = config.train.batch_size, config.model.image_size
    count = max(1, images // batch) * batch
    generator = torch.Generator().manual_seed(1)
    no_images = torch.empty((0, 3, size, size), dtype=torch.uint8, device=device)  # evaluation is not timed here
    no_labels = torch.empty(0, dtype=torch.int64, device=device)
    return DeviceData(torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator).to(device),
                      torch.randint(config.model.num_classes, (count,), generator=generator).to(device),
                      no_images, no_labels, no_images, no_labels)


def measure_full_loop(state: TrainState, config: Config, runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """One epoch of the project's train_one_epoch, after a short untimed warm-up epoch of `settings.warmup` steps."""
    from tqdm.auto import tqdm

    data = loop_data(config, settings.loop_images, runtime.device)
    warm = max(1, settings.warmup) * config.train.batch_size
    with tempfile.TemporaryDirectory() as out_dir, tqdm(disable=True) as bar:
        state.step = 0
        loop = make_loop(config, runtime, state, None, replace(data, train_images=data.train_images[:warm],
                                                                 train_labels=data.train_labels[:warm]), Path(out_dir), bar)
        train_one_epoch(loop)
        # the timed epoch is epoch 0 again: the preset's first-epoch augmentation (MixUp/CutMix on)
        loop.data, loop.first_step, state.step = data, 0, 0
        record, seconds = timed(lambda: train_one_epoch(loop), runtime.device)
    return {"steps": record["steps"], "seconds_timed": seconds, "includes": loop_contents(config, runtime)}


def measure_fit(name: str, config: Config, runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """fit() end to end on synthetic data, with the preset's checkpoint interval (the bare-step config disables it)."""
    import copy
    import time

    from nbhelpers.vit.train import fit

    fit_config = copy.deepcopy(config)
    train = fit_config.train
    train.dataset, train.synthetic_train_size = "synthetic", settings.loop_images
    train.synthetic_test_size = max(train.batch_size, settings.loop_images // 5)
    train.epochs, train.report_plots, train.device = settings.fit_epochs, False, str(runtime.device)
    train.checkpoint_minutes = build_config(name).train.checkpoint_minutes
    with tempfile.TemporaryDirectory() as out_dir, contextlib.redirect_stdout(sys.stderr):
        train.out_dir = out_dir
        start = time.perf_counter()
        result = fit(fit_config)
        seconds = time.perf_counter() - start
    evaluated = sum("test_accuracy" in record for record in result.history)
    return {"steps": result.step, "seconds_timed": seconds, "epochs": len(result.history), "evaluated_epochs": evaluated,
            "test_images": train.synthetic_test_size, "checkpoint_minutes": train.checkpoint_minutes}


def loop_contents(config: Config, runtime: Runtime) -> list[str]:
    """What the full loop does beyond the bare step, for this preset."""
    augment, train = config.augment, config.train
    ops = {"crop": augment.crop_padding > 0, "flip": augment.flip, "TrivialAugment": augment.trivial_augment,
           "random erasing": augment.random_erasing > 0, "MixUp/CutMix": max(augment.mixup_alpha, augment.cutmix_alpha) > 0}
    parts = ["GpuAugment: " + (", ".join(name for name, on in ops.items() if on) or "normalise only"), "soft targets"]
    parts += ["grad clip"] * (train.grad_clip > 0) + ["GradScaler"] * runtime.use_grad_scaler + ["LR schedule"]
    parts += ["EMA"] * (train.ema_decay > 0) + ["shuffle + batch gather", "loss/accuracy sums",
                                                f"host sync every {train.log_every} steps and at the epoch end"]
    return parts


# ----------------------------------------------------------------------------- records


def measurement(path: str, config: Config, context: dict[str, Any], measured: dict[str, Any], images: int) -> dict[str, Any]:
    """One record of `path` ('naive' | 'project' | 'full_loop'): speed, how it was measured, the model and device."""
    measured = dict(measured)
    seconds = measured.pop("seconds_timed")
    speed = speed_fields(images, seconds, context["train_flops_per_image"], context["device"])
    return {"benchmark": "vit_throughput", "model": context["model"], "path": path, "batch_size": config.train.batch_size,
            "images_timed": images, **speed, **measured, **context}


def model_context(name: str, config: Config, model: VisionTransformer, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Fields shared by a model's three records."""
    shape = {key: getattr(config.model, key) for key in ("dim", "depth", "heads", "tokenizer", "lsa")}
    return {"model": name, "preset_model": shape, "parameters": count_parameters(model),
            "train_flops_per_image": train_flops_per_image(model), "warmup_steps": settings.warmup,
            "smoke": settings.smoke, **environment(device)}


def benchmark_model(name: str, settings: Settings, runtime: Runtime) -> list[dict[str, Any]]:
    """Naive step, project step and full loop of one preset's model; each printed as soon as it is measured."""
    config = model_config(name, settings, runtime.device)
    evaluate = runtime.is_cuda and not settings.smoke  # the targets are stated for an H100
    state = build_state(config, runtime, steps_per_epoch=max(1, settings.loop_images // config.train.batch_size))
    context = model_context(name, config, state.model, settings, runtime.device)
    images = settings.steps * config.train.batch_size
    naive = emit(measurement("naive", config, context, measure_naive(config, settings, runtime.device), images))
    project = measurement("project", config, context, measure_project(state, config, runtime, settings), images)
    project["project_over_naive"] = round(project["images_per_second"] / naive["images_per_second"], 3)
    if name == "seed":
        project |= target_fields({key: project[key] for key in SEED_TARGETS}, SEED_TARGETS, evaluate=evaluate)
    emit(project)
    measured = measure_full_loop(state, config, runtime, settings)
    loop = measurement("full_loop", config, context, measured, measured["steps"] * config.train.batch_size)
    loop["bare_step_images_per_second"] = project["images_per_second"]
    # extra time per image over the bare step, in percent
    loop["loop_overhead_percent"] = round(100.0 * (project["images_per_second"] / loop["images_per_second"] - 1.0), 2)
    if name == "fast":
        overhead = {"loop_overhead_percent": loop["loop_overhead_percent"]}
        loop |= target_fields(overhead, LOOP_TARGETS, lower_is_better=tuple(LOOP_TARGETS), evaluate=evaluate)
    emit(loop)
    records = [naive, project, loop]
    if settings.fit_epochs:
        measured = measure_fit(name, config, runtime, settings)
        whole = measurement("fit", config, context, measured, measured["steps"] * config.train.batch_size)
        whole["bare_step_images_per_second"] = project["images_per_second"]
        whole["fit_overhead_percent"] = round(100.0 * (project["images_per_second"] / whole["images_per_second"] - 1.0), 2)
        records.append(emit(whole))
    release_compiled(runtime.device, runtime.compile)
    return records


def summary_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The closing line: project/naive ratio and loop overhead per model, and every evaluated target."""
    by_path = {(record["model"], record["path"]): record for record in records}
    models = list(dict.fromkeys(record["model"] for record in records))
    return {"benchmark": "vit_throughput", "path": "summary",
            "project_over_naive": {model: by_path[model, "project"]["project_over_naive"] for model in models},
            "loop_overhead_percent": {model: by_path[model, "full_loop"]["loop_overhead_percent"] for model in models},
            "fit_overhead_percent": {model: by_path[model, "fit"]["fit_overhead_percent"] for model in models if (model, "fit") in by_path},
            "target_met": {f"{record['model']}/{record['path']}": record["target_met"] for record in records if "target_met" in record},
            "shortfall": {f"{record['model']}/{record['path']}": record["shortfall"] for record in records if record.get("shortfall")},
            **{key: records[0][key] for key in ("device", "torch", "smoke")}}


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets among {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=positive_int, help="images per step for every model (default: each preset's own)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per bare-step path (default 30; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 5; 1 with --smoke)")
    parser.add_argument("--loop-images", type=positive_int, help="images in the timed full-loop epoch (default 50,000 = one CIFAR-10 epoch)")
    parser.add_argument("--fit-epochs", type=int, default=0, help="also time fit() end to end for N epochs (0 = skip)")
    parser.add_argument("--device", help="cuda | cuda:1 | cpu | mps (default: auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, a few steps: checks the script, not speed")
    parser.add_argument("--profile", action="store_true", help="add the project step's top ops (torch.profiler) to its line")
    args = parser.parse_args(argv)
    args.models = [name.strip().lower() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        parser.error(f"--models {','.join(unknown) or '(empty)'}: choose from {','.join(MODELS)}, e.g. --models seed,fast")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """CLI values, with the smoke or GPU defaults where not given."""
    batch = args.batch_size or (8 if args.smoke else None)
    steps = args.steps or (2 if args.smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    loop_images = args.loop_images or ((batch or 8) * 3 if args.smoke else 50_000)
    return Settings(batch, warmup, steps, loop_images, args.smoke, args.profile, args.fit_epochs)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; every line on stdout is one JSON object. Returns the exit code."""
    args = parse_args(argv)
    settings = settings_from(args)
    if args.smoke:
        torch.set_num_threads(1)  # a busy 2-core CI machine stalls two spinning threads (65 s instead of 10)
    runtime = select_runtime("cpu" if args.smoke else args.device, verbose=False)
    records: list[dict[str, Any]] = []
    for name in args.models:
        records += benchmark_model(name, settings, runtime)
    emit(summary_record(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
