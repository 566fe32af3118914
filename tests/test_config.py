"""Presets and parameter overrides."""
import pytest

from nbhelpers.vit.config import PRESETS, Config, build_config


def test_all_presets_exist_and_validate():
    assert {"seed", "fast", "best", "smoke"} <= set(PRESETS)
    for name in PRESETS:
        config = build_config(name)
        assert config.preset == name


def test_seed_preset_is_the_write_up_recipe():
    config = build_config("seed")
    model, train = config.model, config.train
    assert (model.patch_size, model.dim, model.depth, model.heads, model.mlp_dim) == (4, 768, 12, 4, 1536)
    assert (model.dropout, model.embed_dropout, model.tokenizer) == (0.3, 0.3, "spt")
    assert (train.lr, train.betas, train.weight_decay, train.epochs, train.warmup_epochs, train.min_lr) == (6e-4, (0.9, 0.999), 0.3, 200, 30, 1e-6)


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


def test_round_trip_through_dict():
    config = build_config("best")
    assert Config.from_dict(config.to_dict()) == config


def test_conv_tokenizer_ignores_patch_size():
    config = build_config("fast", tokenizer="conv", patch_size=5)
    from nbhelpers.vit.model import VisionTransformer

    assert VisionTransformer(config.model).num_tokens > 0


def test_layerscale_zero_turns_it_off_in_a_preset_that_has_it():
    from nbhelpers.vit.model import VisionTransformer

    assert any(".scale1.gamma" in name for name, _ in VisionTransformer(build_config("best").model).named_parameters())
    model = VisionTransformer(build_config("best", layerscale=0).model)
    assert not any(".scale1" in name or ".scale2" in name for name, _ in model.named_parameters())
