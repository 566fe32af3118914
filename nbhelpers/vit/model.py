"""Vision Transformer for small images, configured by one ModelConfig (reads like timm / nanoGPT).

forward_features -> pool -> head. Three tokenizers (plain patches, Shifted Patch Tokenization of
Lee et al. 2021, a CCT-style convolutional stem), attention through scaled_dot_product_attention with
optional Locality Self-Attention (learned logit scale, diagonal masked), pre-norm blocks with
DropPath and optional LayerScale, and cls / mean / sequence pooling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nbhelpers import distributed
from nbhelpers.platform import Runtime, available_memory

from .config import Config, ModelConfig, validate_model

# ----------------------------------------------------------------------------- tokenizers


class PatchTokenizer(nn.Module):
    """Non-overlapping patch_size x patch_size patches, each projected to `dim` (Conv2d, kernel = stride)."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.grid_side = image_size // patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class ShiftedPatchTokenizer(nn.Module):
    """SPT: the image plus its four diagonal half-patch shifts (15 channels), patchified, LayerNorm, Linear."""

    def __init__(self, image_size: int, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_side = image_size // patch_size
        features = patch_size * patch_size * 15
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, D)
        s, p = self.patch_size // 2, self.patch_size
        # F.pad with a negative amount crops, so each call is a diagonal translation with zero fill.
        shifted = [F.pad(x, (dx, -dx, dy, -dy)) for dx, dy in ((s, s), (-s, s), (s, -s), (-s, -s))]
        x = torch.cat([x, *shifted], dim=1)  # (B, 15, H, W)
        B, C, H, W = x.shape
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return self.proj(self.norm(patches.reshape(B, (H // p) * (W // p), p * p * C)))


class ConvTokenizer(nn.Module):
    """CCT stem: `layers` stages of Conv3x3-ReLU-MaxPool(3, 2, 1); each stage halves the side (rounding up)."""

    def __init__(self, image_size: int, layers: int, dim: int, hidden: int = 64):
        super().__init__()
        if layers < 1:
            raise ValueError(f"conv_layers={layers}: the 'conv' tokenizer needs at least 1 stage.")
        widths = [3] + [hidden] * (layers - 1) + [dim]
        stages: list[nn.Module] = []
        side = image_size
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            stages += [nn.Conv2d(width_in, width_out, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
            side = (side - 1) // 2 + 1
        self.stem = nn.Sequential(*stages)
        self.grid_side = side

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, N, D)
        return self.stem(x).flatten(2).transpose(1, 2)


def sincos_position_embedding(side: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions for a side x side grid, (side*side, dim): x in the first half, y in the second."""
    if dim % 4 != 0:
        raise ValueError(f"pos_embed='sincos' needs dim divisible by 4 (got dim={dim}); use pos_embed='learned' or change dim.")
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    x_angles, y_angles = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega  # (N, D/4)
    return torch.cat([x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()], dim=1)


# ----------------------------------------------------------------------------- transformer block


class Attention(nn.Module):
    """Multi-head self-attention; with `lsa`, logits use a learned scale and tokens cannot attend to themselves."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, dropout: float, lsa: bool):
        super().__init__()
        self.heads, self.head_dim, self.lsa = heads, dim // heads, lsa
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        # Stored as a log so the learned scale stays positive; starts at the usual 1/sqrt(head_dim).
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.head_dim ** -0.5))) if lsa else None

    def split_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> q, k, v each (B, heads, N, head_dim); under LSA q is already multiplied by the scale."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.log_scale is not None:
            q = q * self.log_scale.exp()  # 0-dim fp32 factor keeps q's (autocast) dtype
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        q, k, v = self.split_heads(x)
        allowed = ~torch.eye(N, dtype=torch.bool, device=x.device) if self.lsa else None  # True = may attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.attn_dropout if self.training else 0.0,
            scale=1.0 if self.lsa else None,
        )  # (B, heads, N, head_dim)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))

    def probabilities(self, x: Tensor) -> Tensor:
        """Explicit softmax(q k^T * scale) as used by forward (no dropout): (B, heads, N, N), float32."""
        q, k, _ = self.split_heads(x)
        logits = (q @ k.transpose(-2, -1)).float() * (1.0 if self.lsa else self.head_dim ** -0.5)
        if self.lsa:
            N = x.shape[1]
            logits = logits.masked_fill(torch.eye(N, dtype=torch.bool, device=x.device), float("-inf"))
        return logits.softmax(dim=-1)


class LayerScale(nn.Module):
    """Per-channel learned residual gain (Touvron et al. 2021), initialised small."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training, rescale the kept ones."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each with LayerScale + DropPath."""

    def __init__(self, config: ModelConfig, drop_path: float):
        super().__init__()
        dim = config.dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, config.heads, config.attn_dropout, config.dropout, config.lsa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, config.mlp_dim), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.mlp_dim, dim), nn.Dropout(config.dropout),
        )
        use_scale = bool(config.layerscale)  # None or 0 = off (0 lets a notebook override a preset's value)
        self.scale1 = LayerScale(dim, config.layerscale) if use_scale else nn.Identity()
        self.scale2 = LayerScale(dim, config.layerscale) if use_scale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.drop_path(self.scale1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.scale2(self.mlp(self.norm2(x))))


# ----------------------------------------------------------------------------- model


class VisionTransformer(nn.Module):
    """ViT for (B, 3, image_size, image_size) inputs normalised per channel; returns (B, num_classes) logits."""

    TOKEN_PARAMETERS = frozenset({"cls_token", "pos_embed"})

    @staticmethod
    def check_training_memory(config: Config, runtime: Runtime, world_size: int = 1) -> "MemoryEstimate":
        """Refuse, before anything is allocated, a configuration whose training cannot fit the device's free memory.

        Args:
            config: model and train settings (batch size, EMA, data set size) of the run.
            runtime: the device and precision it runs with.
            world_size: processes sharing each batch (DDP): each holds the model and its share of the batch.
        Returns:
            The estimate. Raises ValueError (bad input: the CLI exits 2) giving the estimate, the free memory and the fix.
        """
        autocast = runtime.amp_dtype is not None
        estimate = estimate_training_memory(config, autocast, world_size)
        # every process decides on the least free memory of any (one refusing alone would leave the others waiting)
        frees = [free for free in distributed.gather_objects(available_memory(runtime.device)) if free is not None]
        free = min(frees) if frees else None
        # on a CPU the data set is already loaded, so it is no longer in the free memory
        loaded = estimate.data_bytes if runtime.device.type == "cpu" else 0
        if free is None or estimate.total_bytes - loaded <= free:
            return estimate
        model, train = config.model, config.train
        shallow = [estimate_training_memory(replace(config, model=replace(model, depth=depth)), autocast, world_size).total_bytes
                   for depth in (0, 1)]
        fitting = int((free + loaded - shallow[0]) // (shallow[1] - shallow[0]))
        hint = f"DEPTH={fitting} would fit with the other settings unchanged" if 1 <= fitting < model.depth else \
            f"lower DIM={model.dim}, MLP_DIM={model.mlp_dim} or BATCH_SIZE={train.batch_size}"
        raise ValueError(
            f"This model cannot train on {runtime.device.type}: it needs about {_gigabytes(estimate.total_bytes)} "
            f"({estimate.parameters:,} parameters: {_gigabytes(estimate.weight_bytes)} with their gradients and optimizer state; "
            f"{_gigabytes(estimate.activation_bytes)} of activations per batch) but {_gigabytes(free)} is free. "
            f"Make it smaller: {hint}.")

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model(config)
        self.config = config
        dim = config.dim
        if config.tokenizer == "patch":
            self.tokenizer: nn.Module = PatchTokenizer(config.image_size, config.patch_size, dim)
        elif config.tokenizer == "spt":
            self.tokenizer = ShiftedPatchTokenizer(config.image_size, config.patch_size, dim)
        else:
            self.tokenizer = ConvTokenizer(config.image_size, config.conv_layers, dim)
        side = self.tokenizer.grid_side
        self.num_prefix_tokens = 1 if config.pool == "cls" else 0
        self.num_tokens = side * side + self.num_prefix_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.pool == "cls" else None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        else:  # the class token gets a zero position
            fixed = torch.cat([torch.zeros(self.num_prefix_tokens, dim), sincos_position_embedding(side, dim)])
            self.register_buffer("pos_embed", fixed.unsqueeze(0), persistent=False)
        self.embed_drop = nn.Dropout(config.embed_dropout)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        # No bias: softmax over tokens ignores a shared offset, so it would never get a gradient.
        self.pool_score = nn.Linear(dim, 1, bias=False) if config.pool == "seqpool" else None
        self.head = nn.Linear(dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d) and isinstance(self.tokenizer, ConvTokenizer):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # ReLU stem, as in CCT
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> tokens (B, N, D) with class token and positions added."""
        size = self.config.image_size
        assert x.ndim == 4 and x.shape[1] == 3 and x.shape[-2] == size and x.shape[-1] == size, (
            f"expected images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}; "
            f"resize the inputs or build the model with image_size={x.shape[-1]}."
        )
        tokens = self.tokenizer(x)  # (B, N_patches, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, N, D)
        return self.embed_drop(tokens + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, N, D) after the final norm
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def pool(self, tokens: Tensor) -> Tensor:  # (B, N, D) -> (B, D)
        if self.config.pool == "cls":
            return tokens[:, 0]
        if self.config.pool == "mean":
            return tokens.mean(dim=1)
        weights = self.pool_score(tokens).softmax(dim=1)  # (B, N, 1): CCT sequence pooling
        return (weights.transpose(1, 2) @ tokens).squeeze(1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, num_classes)
        return self.head(self.pool(self.forward_features(x)))

    @torch.no_grad()
    def attention_maps(self, x: Tensor, layer: int = -1) -> Tensor:
        """Attention probabilities of one block (eval mode, no dropout) for plotting.

        Args:
            x: images (B, 3, S, S), normalised like the training inputs.
            layer: block index; negative counts from the end.
        Returns:
            (B, heads, N, N) float32; rows sum to 1 (N includes the class token when pool='cls').
        """
        depth = len(self.blocks)
        assert -depth <= layer < depth, f"layer={layer} is out of range for depth={depth}; use 0..{depth - 1} or -1."
        index = layer % depth
        was_training = self.training
        self.eval()
        try:
            tokens = self.embed(x)
            for block in self.blocks[:index]:
                tokens = block(tokens)
            target = self.blocks[index]
            return target.attn.probabilities(target.norm1(tokens))
        finally:
            self.train(was_training)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: norms, biases, LayerScale, LSA scales, class token, positions."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name in self.TOKEN_PARAMETERS}


# ----------------------------------------------------------------------------- memory estimate (no allocation)


@dataclass(frozen=True)
class MemoryEstimate:
    """What one training process holds on its device, in bytes, estimated from the config alone."""

    parameters: int  # trainable parameters
    weight_bytes: int  # weights, gradients, AdamW's two moments, the EMA copy, autocast's half-precision copies
    activation_bytes: int  # one training step's peak for this process's share of a batch (saved tensors + backward)
    data_bytes: int  # the uint8 data set, which lives on the device
    overhead_bytes: int  # libraries' workspaces and buffers made on first use
    total_bytes: int


def token_grid_side(config: ModelConfig) -> int:
    """Side of the token grid each tokenizer produces (the 'conv' stem halves the side per stage, rounding up)."""
    if config.tokenizer != "conv":
        return config.image_size // config.patch_size
    side = config.image_size
    for _ in range(config.conv_layers):
        side = (side - 1) // 2 + 1
    return side


def count_parameters(config: ModelConfig) -> int:
    """VisionTransformer(config)'s parameter count, computed without building it."""
    dim, mlp, patch = config.dim, config.mlp_dim, config.patch_size
    if config.tokenizer == "patch":
        tokenizer = 3 * patch * patch * dim + dim
    elif config.tokenizer == "spt":
        features = 15 * patch * patch
        tokenizer = 2 * features + features * dim + dim
    else:
        widths = [3] + [64] * (config.conv_layers - 1) + [dim]  # ConvTokenizer's hidden width is 64
        tokenizer = sum(9 * w_in * w_out for w_in, w_out in zip(widths[:-1], widths[1:]))
    tokens = token_grid_side(config) ** 2 + (config.pool == "cls")
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (2 * dim * mlp + mlp + dim)
    block += 2 * dim * bool(config.layerscale) + int(config.lsa)
    extras = dim * (config.pool == "cls") + tokens * dim * (config.pos_embed == "learned") + dim * (config.pool == "seqpool")
    return tokenizer + extras + config.depth * block + 2 * dim + dim * config.num_classes + config.num_classes


# Bytes one sample keeps for the backward pass per block, per (token x dim), (token x mlp_dim) and (head x token^2)
# element: fp32 saves the residual, both norms' outputs, q/k/v, the attention output and projection input, and the
# MLP's hidden layer twice; autocast keeps most of them in 16 bits. Within 20% of the bytes autograd saved for
# backward in configurations checked on a CPU (the attention term is what the math attention path keeps; flash
# attention keeps less).
_ACTIVATION_BYTES = {False: (36, 8, 4), True: (22, 4, 2)}  # autocast: (N*D, N*M, H*N^2) multipliers
BACKWARD_PEAK = 1.4  # peak activation memory over what is saved: the backward pass's gradients and temporaries
RUNTIME_OVERHEAD_BYTES = 256 * 10**6  # first-use workspaces and buffers: 225-260 MB measured on a CPU


def estimate_training_memory(config: Config, autocast: bool, world_size: int = 1) -> MemoryEstimate:
    """Memory of one training process, from the config alone (nothing is allocated).

    Args:
        autocast: whether the forward pass runs under bf16/fp16 autocast.
        world_size: processes sharing each batch.
    Returns:
        MemoryEstimate.
    """
    model, train = config.model, config.train
    parameters = count_parameters(model)
    copies = 4 + (train.ema_decay > 0)  # weights, gradients, 2 AdamW moments, EMA: fp32 each
    weight_bytes = parameters * (4 * copies + 2 * autocast)
    tokens = token_grid_side(model) ** 2 + 1
    per_token, per_hidden, per_score = _ACTIVATION_BYTES[autocast]
    per_block = tokens * (per_token * model.dim + per_hidden * model.mlp_dim) + per_score * model.heads * tokens ** 2
    per_sample = model.depth * per_block + 16 * tokens * model.dim + 24 * 3 * model.image_size ** 2  # + tokenizer, head, augmentation
    activation_bytes = int(BACKWARD_PEAK * per_sample * max(1, train.batch_size // world_size))
    images = 60_000 if train.dataset == "cifar10" else train.synthetic_train_size + train.synthetic_test_size
    data_bytes = images * 3 * model.image_size ** 2
    total = weight_bytes + activation_bytes + data_bytes + RUNTIME_OVERHEAD_BYTES
    return MemoryEstimate(parameters=parameters, weight_bytes=weight_bytes, activation_bytes=activation_bytes,
                          data_bytes=data_bytes, overhead_bytes=RUNTIME_OVERHEAD_BYTES, total_bytes=total)


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e8 else f"{count / 1e6:,.0f} MB"
