"""Configuration for ViT-on-CIFAR-10 runs: three dataclasses and named presets.

A preset is a factory registered by name (as timm registers models). Notebook and CLI parameters
are applied on top with `build_config(preset, **overrides)`, where None means "the preset's value".
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ModelConfig:
    image_size: int = 32  # input side (px)
    num_classes: int = 10  # output classes
    patch_size: int = 4  # patch side (px) for the 'patch' and 'spt' tokenizers (the 'conv' stem ignores it)
    tokenizer: str = "patch"  # 'patch' (Conv2d k=s=patch) | 'spt' (shifted patch tokenization) | 'conv' (CCT stem)
    conv_layers: int = 2  # 'conv' tokenizer: number of conv-relu-maxpool stages (each halves the side)
    dim: int = 384  # token width
    depth: int = 7  # transformer blocks
    heads: int = 6  # attention heads (dim must divide evenly)
    mlp_dim: int = 1152  # hidden width of each block's MLP
    dropout: float = 0.0  # dropout after attention projection and in the MLP
    embed_dropout: float = 0.0  # dropout on tokens after adding positions
    attn_dropout: float = 0.0  # dropout on attention weights
    drop_path: float = 0.1  # stochastic depth rate of the last block (linear from 0)
    layerscale: float | None = None  # LayerScale init value (e.g. 1e-4); None or 0 = off
    lsa: bool = False  # Locality Self-Attention: learned temperature, diagonal masked
    pool: str = "cls"  # 'cls' | 'mean' | 'seqpool'
    pos_embed: str = "learned"  # 'learned' | 'sincos'


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop after padding each side (px); 0 = off
    flip: bool = True  # random horizontal flip, p = 0.5
    trivial_augment: bool = True  # one random photometric/geometric op per image (TrivialAugment-style)
    augment_magnitude: float = 1.0  # scales the op strength range (0 = identity, 1 = full range)
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) for MixUp; 0 = off
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) for CutMix; 0 = off
    mix_prob: float = 1.0  # probability a batch is mixed at all (MixUp or CutMix, 50/50 when both on)
    mix_off_epochs: int = 0  # last N epochs train without MixUp/CutMix (sharpens the final model)
    random_erasing: float = 0.25  # probability of erasing one random rectangle per image
    label_smoothing: float = 0.1  # label smoothing applied to the (mixed) targets


@dataclass
class TrainConfig:
    dataset: str = "cifar10"  # 'cifar10' (found under data_root, else downloaded) | 'synthetic'
    data_root: str | None = None  # None = platform default (/kaggle/input, /content/data, ./data)
    out_dir: str | None = None  # None = platform default (/kaggle/working/outputs/q1_vit, …)
    val_size: int = 0  # images held out of train for validation (tuning); 0 for final runs
    synthetic_train_size: int = 2000  # 'synthetic' data set: train images
    synthetic_test_size: int = 500  # 'synthetic' data set: test images
    epochs: int = 100  # passes over the training set
    batch_size: int = 512  # images per optimizer step
    eval_batch_size: int = 1024  # images per evaluation forward pass
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-5  # learning rate at the last step (cosine floor)
    warmup_epochs: float = 5.0  # linear warm-up length (epochs, fractional allowed)
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, positions, tokens)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    ema_decay: float = 0.999  # EMA of weights per step; 0 = off
    tta: bool = True  # horizontal-flip test-time augmentation at evaluation
    log_every: int = 50  # steps between progress-bar updates (host syncs only here)
    checkpoint_minutes: float = 10.0  # write last.pt every N minutes (and at the end or a stop); 0 = at every log window and epoch end
    eval_every: int = 0  # evaluate every N epochs during training; 0 = auto (evaluation <= 5% of training time)
    eval_final_epochs: int = 3  # the last N epochs are always evaluated (plus the first, which measures the cost)
    time_budget_minutes: float | None = None  # size the run (LR schedule included) to end within this many minutes; wins over epochs; None = use epochs
    seed: int = 0  # RNG seed for init, data order and augmentation
    device: str | None = None  # None = auto (cuda > mps > cpu)
    precision: str = "auto"  # 'auto' | 'bf16' | 'fp16' | 'fp32'
    compile: bool | None = None  # None = on only where torch.compile works (CUDA, Triton)
    resume: bool = True  # continue from out_dir/last.pt when it exists
    fresh: bool = False  # ignore (and move aside) an existing or corrupt last.pt and start over
    resume_from: str | None = None  # a last.pt (or a folder holding one) to continue when out_dir has none, e.g. a previous Kaggle version's output under /kaggle/input
    stop_after_epochs: int | None = None  # stop early after this many epochs in this call (tests, time-boxing)
    report_plots: bool = True  # draw and save plots at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "custom"  # name of the preset this config was built from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, Callable[[], Config]] = {}


def register_preset(function: Callable[[], Config]) -> Callable[[], Config]:
    """Decorator: register a preset factory under its function name."""
    PRESETS[function.__name__] = function
    return function


@register_preset
def seed() -> Config:
    """The seed write-up's final model and recipe (reported 88% as best-epoch test accuracy)."""
    model = ModelConfig(
        patch_size=4, tokenizer="spt", dim=768, depth=12, heads=4, mlp_dim=1536,
        dropout=0.3, embed_dropout=0.3, drop_path=0.0, pool="cls",
    )
    augment = AugmentConfig(trivial_augment=False, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0, label_smoothing=0.0)
    train = TrainConfig(
        epochs=200, batch_size=128, lr=6e-4, min_lr=1e-6, warmup_epochs=30, weight_decay=0.3,
        betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0, ema_decay=0.0, tta=False,
    )
    return Config(model, augment, train, "seed")


@register_preset
def fast() -> Config:
    """Shortest time to high accuracy: 384x7 ViT, patch 4, strong GPU augmentation, 60 epochs."""
    model = ModelConfig(dim=384, depth=7, heads=6, mlp_dim=1152, tokenizer="patch", drop_path=0.1, pool="cls")
    augment = AugmentConfig(mix_off_epochs=5)
    train = TrainConfig(epochs=60, batch_size=512, lr=2e-3, warmup_epochs=5, weight_decay=0.05)
    return Config(model, augment, train, "fast")


@register_preset
def best() -> Config:
    """Highest accuracy: SPT + LSA ViT 384x9, LayerScale, 300 epochs of strong augmentation."""
    model = ModelConfig(
        dim=384, depth=9, heads=12, mlp_dim=768, tokenizer="spt", lsa=True, drop_path=0.1,
        layerscale=1e-4, pool="cls",
    )
    augment = AugmentConfig(mix_off_epochs=15)
    train = TrainConfig(epochs=300, batch_size=512, lr=1e-3, warmup_epochs=10, weight_decay=0.05, ema_decay=0.9995)
    return Config(model, augment, train, "best")


@register_preset
def cpu() -> Config:
    """About 30 minutes of training on a 2-core CPU: a 128x4 ViT with a convolutional tokenizer (CCT's stem), light
    augmentation, 9 epochs.

    Chosen by measurement on the project's 2-core machine with the JPEG copy of CIFAR-10 (benchmarks/RESULTS.md, "cpu
    preset"): at an equal 5 minutes of training the conv stem reached 62.3% against 57.7% for 4-pixel patches, 58.7%
    for 8-pixel patches 6 deep and 49.7% for a 256x6 model on 8-pixel patches; it trains about 290 images/s there
    (0.46 s a step of 128), so 9 epochs take about 27 minutes.
    """
    model = ModelConfig(dim=128, depth=4, heads=4, mlp_dim=256, tokenizer="conv", drop_path=0.0, pool="cls")
    # A short run of a small model under-fits: MixUp/CutMix, random erasing and TrivialAugment would slow it more.
    augment = AugmentConfig(trivial_augment=False, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0, label_smoothing=0.1)
    train = TrainConfig(epochs=9, batch_size=128, eval_batch_size=500, lr=1e-3, warmup_epochs=1, weight_decay=0.05, ema_decay=0.999)
    return Config(model, augment, train, "cpu")


@register_preset
def smoke() -> Config:
    """Tiny model on the synthetic data set: trains in seconds on a CPU (tests, CI, smoke runs)."""
    model = ModelConfig(dim=64, depth=2, heads=2, mlp_dim=128, patch_size=8, drop_path=0.0)
    augment = AugmentConfig(trivial_augment=False, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0, label_smoothing=0.0)
    train = TrainConfig(
        dataset="synthetic", epochs=6, batch_size=64, eval_batch_size=256, lr=2e-3, warmup_epochs=1,
        weight_decay=0.01, ema_decay=0.98, log_every=10, synthetic_train_size=2000, synthetic_test_size=500,
    )
    return Config(model, augment, train, "smoke")


# ----------------------------------------------------------------------------- overrides


def _field_owner(config: Config) -> dict[str, object]:
    owner: dict[str, object] = {}
    for part in (config.model, config.augment, config.train):
        for item in dataclasses.fields(part):
            assert item.name not in owner, f"field {item.name} appears in two config sections"
            owner[item.name] = part
    return owner


def build_config(preset: str = "fast", **overrides: Any) -> Config:
    """Build a preset and apply flat overrides (names case-insensitive; None = keep the preset's value).

    Args:
        preset: one of PRESETS ('seed', 'fast', 'best', 'smoke').
        overrides: any field of ModelConfig, AugmentConfig or TrainConfig, e.g. EPOCHS=10, dim=256.
    Returns:
        The Config. Unknown presets or names raise ValueError naming the closest valid ones.
    """
    name = str(preset).lower()
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        raise ValueError(f"Unknown PRESET={preset!r}. Choose one of {sorted(PRESETS)}" + (f" (did you mean {hint[0]!r}?)" if hint else "."))
    config = PRESETS[name]()
    owner = _field_owner(config)
    for key, value in overrides.items():
        field_name = key.lower()
        if field_name not in owner:
            hint = difflib.get_close_matches(field_name, owner, n=1)
            raise ValueError(f"Unknown parameter {key!r}" + (f"; did you mean {hint[0].upper()!r}?" if hint else f". Valid names: {sorted(owner)}"))
        if value is not None:
            if isinstance(value, list):  # papermill and YAML hand tuples over as lists
                value = tuple(value)
            setattr(owner[field_name], field_name, value)
    validate_fields(config)
    validate(config)
    return config


# ----------------------------------------------------------------------------- field types and ranges

# Numbers are finite and >= 0 unless listed here. Each name maps to (lowest, highest, whether lowest is allowed).
POSITIVE = (0, math.inf, False)
FRACTION = (0, 1, True)  # 0 <= x <= 1
FIELD_RANGES: dict[str, tuple[float, float, bool]] = {
    **dict.fromkeys(("image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "epochs",
                     "batch_size", "eval_batch_size", "lr", "eps", "log_every", "synthetic_train_size",
                     "synthetic_test_size", "stop_after_epochs", "time_budget_minutes"), POSITIVE),
    **dict.fromkeys(("dropout", "embed_dropout", "attn_dropout", "drop_path", "mix_prob", "random_erasing",
                     "label_smoothing", "betas"), FRACTION),
    "ema_decay": (0, 1, True),  # and below 1 (BELOW_ONE)
    "num_classes": (2, math.inf, True),
}
BELOW_ONE = {"ema_decay", "betas", "label_smoothing"}  # 1 itself is refused too (a decay or target that never moves)


def _type_error(value: Any, annotation: Any) -> str | None:
    """Why `value` does not fit the field's annotation (None when it does). bool is not accepted as a number."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        return None if type(None) in options else "must not be None"
    for option in (o for o in options if o is not type(None)):
        if option is bool and isinstance(value, bool):
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if option is str and isinstance(value, str):
            return None
        if typing.get_origin(option) is tuple and isinstance(value, tuple) and len(value) == len(typing.get_args(option)) \
                and all(_type_error(item, kind) is None for item, kind in zip(value, typing.get_args(option))):
            return None
    names = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}
    expected = " or ".join("None" if o is type(None) else names.get(o, f"{len(typing.get_args(o))} numbers in brackets") for o in options)
    return f"must be {expected}"


def _range_error(name: str, value: Any) -> str | None:
    """Why a (type-checked) number is out of range, or None."""
    numbers = value if isinstance(value, tuple) else (value,)
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    if not all(math.isfinite(n) for n in numbers):
        return "must be a finite number"
    low, high, low_allowed = FIELD_RANGES.get(name, (0, math.inf, True))
    for number in numbers:
        if number < low or (number == low and not low_allowed):
            return f"must be {'at least' if low_allowed else 'greater than'} {low}"
        if number > high or (name in BELOW_ONE and number >= 1):
            return f"must be {'below' if name in BELOW_ONE else 'at most'} {high}"
    return None


def validate_fields(config: Config) -> None:
    """Check every field's value against its dataclass annotation and range; raise ValueError listing each bad one.

    Each problem names the parameter (as the notebook spells it), the value, what is expected and the preset's value.
    """
    defaults = PRESETS[config.preset]() if config.preset in PRESETS else Config()
    problems = []
    for section in ("model", "augment", "train"):
        part, default = getattr(config, section), getattr(defaults, section)
        hints = typing.get_type_hints(type(part))
        for item in dataclasses.fields(part):
            value = getattr(part, item.name)
            reason = _type_error(value, hints[item.name]) or _range_error(item.name, value)
            if reason:
                problems.append(f"{item.name.upper()}={value!r} {reason} (the preset's value is {getattr(default, item.name)!r})")
            elif isinstance(value, int) and not isinstance(value, bool) and hints[item.name] in (float, float | None):
                setattr(part, item.name, float(value))
    if problems:
        raise ValueError("Invalid parameter value(s): " + "; ".join(problems) + ".")


def read_config_file(path: str, **overrides: Any) -> Config:
    """A Config from the JSON of `Config.to_dict()` (e.g. written by the notebook's launcher for torchrun).

    Args:
        overrides: as for `build_config`, applied on top (None = keep the file's value).
    """
    import json

    with open(path) as file:
        saved = json.load(file)
    fields = {name: value for section in ("model", "augment", "train") for name, value in saved[section].items()}
    preset = saved.get("preset", "custom")
    fields |= {name: value for name, value in overrides.items() if value is not None}
    config = build_config(preset if preset in PRESETS else "fast", **fields)  # every field is set: the base is irrelevant
    config.preset = preset
    return config


def validate_model(model: ModelConfig) -> None:
    """Raise ValueError with a fix for model settings that cannot work (also called by VisionTransformer)."""
    checks = [
        (model.tokenizer in ("patch", "spt", "conv"), f"tokenizer={model.tokenizer!r}: use 'patch', 'spt' or 'conv'."),
        (model.pool in ("cls", "mean", "seqpool"), f"pool={model.pool!r}: use 'cls', 'mean' or 'seqpool'."),
        (model.pos_embed in ("learned", "sincos"), f"pos_embed={model.pos_embed!r}: use 'learned' or 'sincos'."),
        (model.dim % model.heads == 0, f"dim={model.dim} is not divisible by heads={model.heads}."),
        (model.tokenizer == "conv" or model.image_size % model.patch_size == 0,
         f"image_size={model.image_size} is not a multiple of patch_size={model.patch_size}."),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def validate(config: Config) -> None:
    """Raise ValueError with a fix for settings that cannot work together (ranges: `validate_fields`, the one place)."""
    validate_model(config.model)
    train = config.train
    checks = [
        (train.dataset in ("cifar10", "synthetic"), f"dataset={train.dataset!r}: use 'cifar10' or 'synthetic'."),
        (train.min_lr <= train.lr, f"min_lr={train.min_lr} is above lr={train.lr}: the cosine floor must not exceed the peak."),
        (train.precision in ("auto", "bf16", "fp16", "fp32"), f"precision={train.precision!r}: use 'auto', 'bf16', 'fp16' or 'fp32'."),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
