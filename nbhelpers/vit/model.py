"""Vision Transformer for small images, configured by one ModelConfig (reads like timm / nanoGPT).

forward_features -> pool -> head. Three tokenizers (plain patches, Shifted Patch Tokenization of
Lee et al. 2021, a CCT-style convolutional stem), attention through scaled_dot_product_attention with
optional Locality Self-Attention (learned logit scale, diagonal masked), pre-norm blocks with
DropPath and optional LayerScale, and cls / mean / sequence pooling.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig, validate_model

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
