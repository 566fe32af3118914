"""VisionTransformer: shapes and gradients for every pair of options, attention maps, weight-decay groups, training signal."""
from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F

from nbhelpers.platform import Runtime, available_memory, select_runtime
from nbhelpers.vit.config import ModelConfig, build_config
from nbhelpers.vit.model import BACKWARD_PEAK, VisionTransformer, count_parameters, estimate_training_memory, token_grid_side


def tiny(**overrides) -> ModelConfig:
    base = dict(image_size=32, num_classes=10, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64, drop_path=0.0)
    base.update(overrides)
    return ModelConfig(**base)


def expected_patches(config: ModelConfig) -> int:
    if config.tokenizer == "conv":
        return (config.image_size // 2 ** config.conv_layers) ** 2
    return (config.image_size // config.patch_size) ** 2


OPTIONS = {"tokenizer": ("patch", "spt", "conv"), "pool": ("cls", "mean", "seqpool"), "pos_embed": ("learned", "sincos"),
           "lsa": (False, True), "layerscale": (None, 0.1)}
# Every pair of option values appears in at least one row (checked below): 9 models instead of the 72 of the full product.
PAIRWISE = [
    ("patch", "cls", "learned", False, None), ("patch", "mean", "sincos", True, 0.1), ("spt", "seqpool", "learned", False, 0.1),
    ("conv", "seqpool", "sincos", True, None), ("spt", "cls", "sincos", True, None), ("conv", "mean", "learned", False, None),
    ("conv", "cls", "learned", True, 0.1), ("patch", "seqpool", "sincos", False, None), ("spt", "mean", "learned", False, None),
]


@pytest.mark.parametrize("tokenizer,pool,pos_embed,lsa,layerscale", PAIRWISE)
def test_shapes_and_gradients_for_each_option_pair(tokenizer, pool, pos_embed, lsa, layerscale):
    config = tiny(tokenizer=tokenizer, pool=pool, pos_embed=pos_embed, lsa=lsa, layerscale=layerscale)
    model = VisionTransformer(config)
    x = torch.randn(4, 3, 32, 32)
    tokens = model.forward_features(x)
    n = expected_patches(config) + (1 if pool == "cls" else 0)
    assert tokens.shape == (4, n, 32) and model.num_tokens == n
    assert model.pool(tokens).shape == (4, 32)
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(4)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


def test_conv_tokenizer_token_count_follows_conv_layers():
    for layers, side in ((1, 16), (2, 8), (3, 4)):
        model = VisionTransformer(tiny(tokenizer="conv", conv_layers=layers, pool="mean"))
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[1] == side * side


def test_shifted_patch_tokenizer_sees_its_shifted_copies():
    # A token's features change when a pixel just outside its patch changes (the half-patch shifts bring it in).
    model = VisionTransformer(tiny(tokenizer="spt", pool="mean")).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[0, :, 0, 9] += 5.0  # column 9 belongs to the second patch; shifted by 4 it reaches the first
    first_token = lambda images: model.tokenizer(images)[0, 0]
    assert not torch.allclose(first_token(x), first_token(y))


@pytest.mark.parametrize("lsa", [False, True])
def test_attention_maps_are_probabilities_and_match_forward(lsa):
    model = VisionTransformer(tiny(lsa=lsa, attn_dropout=0.5)).train()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x, layer=-1)
    assert maps.shape == (2, 2, model.num_tokens, model.num_tokens)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, model.num_tokens), atol=1e-5)
    diagonal = maps.diagonal(dim1=-2, dim2=-1)
    assert (diagonal == 0).all() if lsa else (diagonal > 0).all()
    assert model.training, "attention_maps must restore training mode"
    # The explicit probabilities reproduce the SDPA path of the same block.
    model.eval()
    block = model.blocks[0]
    tokens = block.norm1(model.embed(x))
    _, _, v = block.attn.split_heads(tokens)
    manual = block.attn.probabilities(tokens) @ v  # (B, heads, N, head_dim)
    manual = block.attn.proj(manual.transpose(1, 2).reshape(2, model.num_tokens, 32))
    assert torch.allclose(block.attn(tokens), manual, atol=1e-5)


def test_lsa_scale_starts_at_standard_value_and_is_learned():
    model = VisionTransformer(tiny(lsa=True))
    scale = model.blocks[0].attn.log_scale
    assert torch.isclose(scale.exp(), torch.tensor(16 ** -0.5))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_no_weight_decay_names():
    model = VisionTransformer(tiny(lsa=True, layerscale=1e-4, pool="cls"))
    excluded = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "blocks.0.attn.log_scale",
            "blocks.1.scale1.gamma", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= excluded
    assert excluded <= set(names)
    decayed = set(names) - excluded
    assert {"head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.0.weight", "tokenizer.proj.weight"} <= decayed
    assert all(names[name].ndim >= 2 for name in decayed)
    sincos = VisionTransformer(tiny(pos_embed="sincos", pool="mean"))
    assert "pos_embed" not in dict(sincos.named_parameters())  # a fixed buffer, not trained


def test_drop_path_schedule_and_train_eval_behaviour():
    model = VisionTransformer(tiny(depth=3, drop_path=0.5))
    assert [block.drop_path.drop_prob for block in model.blocks] == pytest.approx([0.0, 0.25, 0.5])
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_bad_input_size_raises_with_message():
    model = VisionTransformer(tiny())
    with pytest.raises(AssertionError, match=r"image_size=64"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by heads"):
        VisionTransformer(tiny(dim=30, heads=4))
    with pytest.raises(ValueError, match="sincos"):
        VisionTransformer(tiny(dim=34, heads=2, pos_embed="sincos"))


def test_init_is_timm_style():
    model = VisionTransformer(tiny(dim=64, mlp_dim=256))
    weight = model.blocks[0].mlp[0].weight
    assert 0.017 < weight.std().item() < 0.023 and abs(weight.mean().item()) < 0.002  # trunc_normal_(std=0.02) as timm
    assert (model.blocks[0].mlp[0].bias == 0).all() and (model.norm.weight == 1).all()


def test_compiles_without_graph_breaks_and_runs_under_autocast():
    model = VisionTransformer(tiny(tokenizer="spt", lsa=True, layerscale=1e-4, drop_path=0.1)).train()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: any graph break raises
    assert compiled(x).shape == (2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_tiny_model_overfits_a_batch():
    torch.manual_seed(0)
    model = VisionTransformer(tiny(image_size=16, patch_size=4, dim=32, mlp_dim=64, heads=2))
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert (model(images).argmax(1) == labels).float().mean() == 1.0


# ----------------------------------------------------------------------------- memory estimate and refusal (issue 22)


@pytest.mark.parametrize("tokenizer,pool,pos_embed,lsa,layerscale", PAIRWISE)
def test_parameter_count_from_the_config_matches_the_built_model(tokenizer, pool, pos_embed, lsa, layerscale):
    for conv_layers in (1, 3):
        config = tiny(tokenizer=tokenizer, pool=pool, pos_embed=pos_embed, lsa=lsa, layerscale=layerscale, conv_layers=conv_layers)
        model = VisionTransformer(config)
        assert count_parameters(config) == sum(p.numel() for p in model.parameters())
        assert token_grid_side(config) ** 2 + (pool == "cls") == model.num_tokens


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("overrides", [dict(dim=64, depth=3, heads=2, mlp_dim=128, patch_size=4, batch_size=8),
                                       dict(dim=96, depth=2, heads=4, mlp_dim=384, patch_size=8, batch_size=16, tokenizer="spt", lsa=True)])
def test_activation_estimate_tracks_what_autograd_saves(overrides, autocast):
    """The per-block formula against the bytes autograd really keeps for backward (peak RSS is checked in the report)."""
    config = build_config("smoke", **overrides)
    model = VisionTransformer(config.model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(torch.randn(config.train.batch_size, 3, 32, 32)).float().sum()
    estimate = estimate_training_memory(config, autocast)
    ratio = estimate.activation_bytes / BACKWARD_PEAK / sum(saved.values())
    assert 0.6 < ratio < 1.6, f"estimate {estimate.activation_bytes / BACKWARD_PEAK:,.0f} B vs saved {sum(saved.values()):,} B"
    doubled = estimate_training_memory(build_config("smoke", **(overrides | {"batch_size": 2 * overrides["batch_size"]})), autocast)
    assert doubled.activation_bytes == pytest.approx(2 * estimate.activation_bytes, rel=0.01)


def test_a_config_that_cannot_fit_is_refused_with_the_estimate_and_a_depth_that_fits(monkeypatch):
    from nbhelpers.vit import model as model_module

    runtime = select_runtime("cpu", verbose=False)
    free = 4 * 10**9  # other processes change this machine's free memory between calls: hold it still
    monkeypatch.setattr(model_module, "available_memory", lambda device: free)
    assert VisionTransformer.check_training_memory(build_config("smoke"), runtime).total_bytes < free
    with pytest.raises(ValueError) as refused:
        VisionTransformer.check_training_memory(build_config("smoke", depth=1_000_000), runtime)
    message = str(refused.value)
    assert "\n" not in message and re.search(r"needs about [\d,.]+ GB .* but 4.0 GB is free", message), message
    fitting = int(re.search(r"DEPTH=(\d+) would fit", message).group(1))
    fits = VisionTransformer.check_training_memory(build_config("smoke", depth=fitting), runtime)
    assert fits.total_bytes - fits.data_bytes <= free  # on a CPU the data set is loaded already: not in the free memory
    with pytest.raises(ValueError, match=f"DEPTH={fitting} would fit"):
        VisionTransformer.check_training_memory(build_config("smoke", depth=fitting + 1), runtime)


def test_on_a_gpu_the_free_device_memory_decides(monkeypatch):
    # No GPU here: the device's memory query stands in for a 16 GB T4 with 15 GB free (and 1 GB cached by PyTorch, unused).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * 10**9, 16 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10**9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    runtime = Runtime(torch.device("cuda"), torch.float16, True, False, "a T4")
    assert VisionTransformer.check_training_memory(build_config("fast"), runtime).total_bytes < 16 * 10**9
    with pytest.raises(ValueError, match=r"cannot train on cuda: .* but 16.0 GB is free. Make it smaller: lower DIM=384"):
        VisionTransformer.check_training_memory(build_config("fast", batch_size=8192), runtime)


def test_the_cli_refuses_a_million_blocks_in_seconds_before_building_any(tmp_path, monkeypatch, capsys):
    # python -m nbhelpers.vit --preset smoke --set depth=1000000: the process grew to 23 GB
    from nbhelpers.vit import model as model_module
    from nbhelpers.vit.__main__ import main

    class Tripwire(model_module.Block):  # stops the old behaviour long before it fills the machine's memory
        built = 0

        def __init__(self, *args, **kwargs):
            Tripwire.built += 1
            assert Tripwire.built <= 100, "the model is being built block by block: the memory check did not run"
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(model_module, "Block", Tripwire)
    start = time.monotonic()
    code = main(["--preset", "smoke", "--set", "depth=1000000", "--out", str(tmp_path), "--device", "cpu", "--no-plots"])
    printed = capsys.readouterr()
    assert code == 2 and time.monotonic() - start < 60 and Tripwire.built == 0
    errors = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in printed.err, printed.err
    assert "cannot train on cpu" in errors[0] and "--set depth=" in errors[0] and "would fit" in errors[0]
    assert not (tmp_path / ".run.lock").exists() and not (tmp_path / "last.pt").exists()
