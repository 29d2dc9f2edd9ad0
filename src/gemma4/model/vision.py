"""The Gemma 4 vision encoder (`Gemma4VisionModel`) and the embedder that brings its soft tokens
into the text model's width (`Gemma4MultimodalEmbedder`). Images and video frames arrive as
16-px patches with their (x, y) grid positions; each image becomes one soft token per 3x3 patches.

Module and parameter names equal the checkpoint's (`model.vision_tower.*`, `model.embed_vision.*`).
Axes: N images, P patches, H heads, D head_dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import VisionConfig
from .layers import RMSNorm, gelu_tanh
from .rope import apply_rotary


class ClippableLinear(nn.Module):
    """A linear whose input and output may be clamped to bounds the checkpoint stores
    (`use_clipped_linears`: the edge models' encoders)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for bound in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(bound, torch.tensor(float("inf") if bound.endswith("max") else -float("inf")))

    def forward(self, x: Tensor) -> Tensor:
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = self.linear(x)
        return torch.clamp(x, self.output_min, self.output_max) if self.clipped else x


def axial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """2-D RoPE: the first half of each head rotates with the x position, the second with y.
    x: [N, P, H, D]; cos, sin: [N, P, D] laid out (x, x, y, y)."""
    half = x.shape[-1] // 2
    parts = [apply_rotary(x[..., i * half : (i + 1) * half], cos[..., i * half : (i + 1) * half], sin[..., i * half : (i + 1) * half]) for i in range(2)]
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        heads, kv_heads, D, hidden, clipped = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                               config.hidden_size, config.use_clipped_linears)
        self.head_dim = D
        self.q_proj = ClippableLinear(hidden, heads * D, clipped)
        self.k_proj = ClippableLinear(hidden, kv_heads * D, clipped)
        self.v_proj = ClippableLinear(hidden, kv_heads * D, clipped)
        self.o_proj = ClippableLinear(heads * D, hidden, clipped)
        self.q_norm = RMSNorm(D, config.rms_norm_eps)
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.v_norm = RMSNorm(D, config.rms_norm_eps, with_scale=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor) -> Tensor:
        N, P, _ = x.shape
        shape = (N, P, -1, self.head_dim)
        q = axial_rotary(self.q_norm(self.q_proj(x).view(shape)), cos, sin).transpose(1, 2)
        k = axial_rotary(self.k_norm(self.k_proj(x).view(shape)), cos, sin).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(shape)).transpose(1, 2)
        # Every patch sees every real patch of its image (no causality); scale 1.0: the norms stand for it.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=1.0, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(N, P, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, width, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(hidden, width, clipped)
        self.up_proj = ClippableLinear(hidden, width, clipped)
        self.down_proj = ClippableLinear(width, hidden, clipped)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, valid))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixels: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """pixels [N, P, 3*16*16] in [0, 1]; positions [N, P, 2] (x, y), -1 on padding."""
        table = self.position_embedding_table  # in the compute dtype (matrices may be stored narrower)
        x = self.input_proj((2 * (pixels - 0.5)).to(table.dtype))  # no normalisation: [0, 1] -> [-1, 1]
        at = positions.clamp(min=0)
        where = F.embedding(at[..., 0], table[0]) + F.embedding(at[..., 1], table[1])
        return x + torch.where(valid[..., None], where, 0.0)


class VisionEncoder(nn.Module):
    """`Gemma4VisionModel`: patches -> soft tokens [tokens, hidden] (padding dropped), in fp32."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [N, P, D] for (x, y) positions, laid out as the reference lays them (x, x, y, y)."""
        spatial = self.config.head_dim // 2
        inverse = 1.0 / self.config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial)
        freqs = positions[..., None].float() * inverse  # [N, P, 2, D/4]
        cos, sin = freqs.cos(), freqs.sin()
        layout = lambda t: torch.cat([t[:, :, 0], t[:, :, 0], t[:, :, 1], t[:, :, 1]], dim=-1).to(dtype)  # noqa: E731
        return layout(cos), layout(sin)

    def forward(self, pixels: Tensor, positions: Tensor) -> Tensor:
        """pixels [N, P, 3*16*16], positions [N, P, 2] -> soft tokens [sum of tokens per image, hidden].

        Each image keeps only the tokens its real patches make, in reading order."""
        valid = (positions != -1).all(dim=-1)
        x = self.patch_embedder(pixels, positions, valid)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, valid)
        tokens = self.pool(x.masked_fill(~valid[..., None], 0.0), positions)
        return tokens.to(x.dtype)

    def pool(self, x: Tensor, positions: Tensor) -> Tensor:
        """Average each k x k group of patches (k = 3) into one token, times sqrt(hidden), in fp32;
        then standardise. Padding patches are zero and fall in a real group: they add nothing."""
        k = self.config.pooling_kernel_size
        wide = torch.promote_types(x.dtype, torch.float32)  # sqrt(hidden) can overflow fp16: the reference scales in fp32
        out = []
        for image, where in zip(x, positions.clamp(min=0)):
            width = int(where[:, 0].max()) + 1
            group = (where[:, 0] // k) + (width // k) * (where[:, 1] // k)
            tokens = int(group.max()) + 1
            weights = F.one_hot(group.long(), tokens).to(wide) / k**2  # [P, tokens]
            out.append((weights.T @ image.to(wide)).to(x.dtype))
        pooled = torch.cat(out).to(wide) * self.config.hidden_size**0.5
        if self.config.standardize:
            pooled = (pooled - self.std_bias.to(wide)) * self.std_scale.to(wide)
        return pooled


class MultimodalEmbedder(nn.Module):
    """`Gemma4MultimodalEmbedder`: RMSNorm without a weight, then a projection to the text width."""

    def __init__(self, width: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(width, eps, with_scale=False)
        self.embedding_projection = nn.Linear(width, text_hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
