"""Presets and parameter overrides."""
import re

import pytest

from nbhelpers.vit.config import PRESETS, build_config


def test_a_parameter_left_at_none_keeps_each_presets_value():
    """The notebook and CLI pass every parameter, None where the user set nothing: None must mean the preset's value."""
    import dataclasses

    for name in PRESETS:
        config = build_config(name)
        unset = {item.name: None for part in (config.model, config.augment, config.train) for item in dataclasses.fields(part)}
        assert build_config(name, **unset) == config, name
        assert build_config(name, depth=3).model.depth == 3 and build_config(name, depth=3).train == config.train


# The seed write-up's "Final Configuration" (shared/seeds/000, lines 124-147), typed here by hand so the
# preset is checked against the write-up and not against itself.
WRITE_UP_FINAL = {
    "model.image_size": 32, "model.patch_size": 4, "model.num_classes": 10, "model.dim": 768, "model.mlp_dim": 1536,
    "model.depth": 12, "model.heads": 4, "model.dropout": 0.3, "model.embed_dropout": 0.3, "model.tokenizer": "spt",
    "train.lr": 6e-4, "train.betas": (0.9, 0.999), "train.eps": 1e-8, "train.weight_decay": 0.3,
    "train.epochs": 200, "train.warmup_epochs": 30, "train.min_lr": 1e-6,
    # plain cross-entropy: none of our extra regularisers
    "augment.label_smoothing": 0.0, "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0, "augment.trivial_augment": False,
}


def test_seed_preset_is_the_write_up_recipe():
    config = build_config("seed")
    for dotted, expected in WRITE_UP_FINAL.items():
        section, name = dotted.split(".")
        assert getattr(getattr(config, section), name) == expected, f"seed preset {dotted} differs from the write-up's {expected!r}"


def test_overrides_are_case_insensitive_and_none_keeps_preset():
    config = build_config("fast", EPOCHS=3, LR=None, dim=192, heads=3)
    assert config.train.epochs == 3 and config.model.dim == 192
    assert config.train.lr == build_config("fast").train.lr


def test_unknown_preset_and_parameter_name_suggest_fixes():
    with pytest.raises(ValueError, match="did you mean 'fast'"):
        build_config("fsat")
    with pytest.raises(ValueError, match="did you mean 'EPOCHS'"):
        build_config("fast", EPOCH=3)


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        build_config("fast", dim=100, heads=3)
    with pytest.raises(ValueError, match="tokenizer"):
        build_config("fast", tokenizer="pixels")


def test_conv_tokenizer_ignores_patch_size():
    # The CCT stem halves the side per conv stage: 32 -> 8 with 2 stages, whatever PATCH_SIZE says.
    from nbhelpers.vit.model import VisionTransformer

    tokens = [VisionTransformer(build_config("fast", tokenizer="conv", patch_size=size).model).num_tokens for size in (2, 5, 8)]
    config = build_config("fast", tokenizer="conv")
    side = config.model.image_size // 2 ** config.model.conv_layers
    expected = side * side + (1 if config.model.pool == "cls" else 0)
    assert tokens == [expected] * 3


def test_layerscale_zero_turns_it_off_in_a_preset_that_has_it():
    from nbhelpers.vit.model import VisionTransformer

    assert any(".scale1.gamma" in name for name, _ in VisionTransformer(build_config("best").model).named_parameters())
    model = VisionTransformer(build_config("best", layerscale=0).model)
    assert not any(".scale1" in name or ".scale2" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("name, value, expected", [
    ("epochs", "ten", "EPOCHS='ten' must be a whole number"),
    ("betas", 0.9, "BETAS=0.9 must be 2 numbers in brackets"),
    ("checkpoint_minutes", "10m", "CHECKPOINT_MINUTES='10m' must be a number"),
    ("epochs", 2.5, "EPOCHS=2.5 must be a whole number"),
    ("lr", float("inf"), "LR=inf must be a finite number"),
    ("min_lr", -5, "MIN_LR=-5 must be at least 0"),
    ("warmup_epochs", -3, "WARMUP_EPOCHS=-3 must be at least 0"),
    ("eval_batch_size", 0, "EVAL_BATCH_SIZE=0 must be greater than 0"),
    ("tta", 1, "TTA=1 must be True or False"),
    ("ema_decay", 1.0, "EMA_DECAY=1.0 must be below 1"),
    ("dropout", 1.5, "DROPOUT=1.5 must be at most 1"),
    ("device", 0, "DEVICE=0 must be a string or None"),
])
def test_every_field_is_type_and_range_checked_at_build_time(name, value, expected):
    # each of these used to pass build_config and fail later (TypeError mid-run, "epoch 3/2.5", an infinite LR)
    with pytest.raises(ValueError, match=re.escape(expected) + r" \(the preset's value is"):
        build_config("smoke", **{name: value})


def test_valid_values_of_the_annotated_types_are_accepted():
    config = build_config("smoke", lr=1, betas=[0.8, 0.95], layerscale=None, device="cpu", stop_after_epochs=2)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)  # an int for a float field is widened
    assert config.train.betas == (0.8, 0.95)
