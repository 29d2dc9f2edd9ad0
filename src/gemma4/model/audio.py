"""The Gemma 4 audio encoder (`Gemma4AudioModel`, E2B/E4B): log-mel frames -> soft tokens, one per
40 ms. Two stride-2 convolutions subsample the 10 ms frames; conformer blocks follow, each a
half-step feed-forward, chunked local self-attention with relative positions and a tanh logit cap,
a light causal depthwise convolution, and a second half-step feed-forward.

Names equal the checkpoint's (`model.audio_tower.*`). Axes: B clips, T frames, H heads, D head_dim,
K blocks of `chunk` queries, C the keys a block sees."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AudioConfig
from .layers import RMSNorm
from .vision import ClippableLinear


class SubsampleLayer(nn.Module):
    """3x3 convolution with stride 2 over (time, frequency), LayerNorm over channels, ReLU."""

    def __init__(self, channels_in: int, channels_out: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(channels_out, eps=eps, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.conv((x * mask[:, None, :, None]).to(self.conv.weight.dtype))
        x = F.relu(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return x, mask[:, ::2]


class SubsampleConvProjection(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        c0, c1 = config.subsampling_conv_channels
        self.layer0 = SubsampleLayer(1, c0, config.rms_norm_eps)
        self.layer1 = SubsampleLayer(c0, c1, config.rms_norm_eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, config.hidden_size, bias=False)

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x, mask = self.layer0(features[:, None], mask)
        x, mask = self.layer1(x, mask)
        B, _, T, _ = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(B, T, -1)), mask


class AudioAttention(nn.Module):
    """Each block of `chunk` frames attends to itself and the `left - 1` frames before it (and
    `right` after), scores = content (q.k) + relative position (q.r), capped by tanh."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = hidden // self.heads
        self.chunk = config.attention_chunk_size
        self.past = config.attention_context_left - 1
        self.future = config.attention_context_right
        self.context = self.chunk + self.past + self.future
        self.cap = config.attention_logit_cap
        self.invalid = config.attention_invalid_logits_value
        clipped = config.use_clipped_linears
        self.q_proj = ClippableLinear(hidden, hidden, clipped)
        self.k_proj = ClippableLinear(hidden, hidden, clipped)
        self.v_proj = ClippableLinear(hidden, hidden, clipped)
        self.post = ClippableLinear(hidden, hidden, clipped)
        self.relative_k_proj = nn.Linear(hidden, hidden, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))

    def blocks(self, x: Tensor) -> Tensor:
        """[B, T, H, D] -> [B, K, chunk, H, D], zero-padded at the end."""
        B, T, H, D = x.shape
        K = -(-T // self.chunk)
        return F.pad(x, (0, 0, 0, 0, 0, K * self.chunk - T)).reshape(B, K, self.chunk, H, D)

    def contexts(self, x: Tensor) -> Tensor:
        """[B, T, H, D] -> [B, K, C, H, D]: the keys each block sees, overlapping."""
        x = F.pad(x, (0, 0, 0, 0, self.past, self.future + self.chunk - 1))
        return torch.movedim(x.unfold(1, self.context, self.chunk), -1, 2)

    def relative_shift(self, x: Tensor) -> Tensor:
        """[B, H, K, chunk, P] scores by relative distance -> [B, H, K, chunk, C] by key (Transformer-XL)."""
        B, H, K, Q, P = x.shape
        x = F.pad(x, (0, self.context + 1 - P)).view(B, H, K, Q * (self.context + 1))
        return x[..., : Q * self.context].view(B, H, K, Q, self.context)

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """x [B, T, hidden]; positions: relative position embeddings [P, hidden]; mask [B, 1, K, chunk, C] True = allowed."""
        B, T, _ = x.shape
        shape = (B, T, self.heads, self.head_dim)
        wide = torch.promote_types(x.dtype, torch.float32)  # scores in fp32 at least, as the reference computes them
        q = self.q_proj(x).to(wide).view(shape) * (self.head_dim**-0.5 / math.log(2)) * F.softplus(self.per_dim_scale)
        k = self.k_proj(x).to(wide).view(shape) * (math.log(1 + math.e) / math.log(2))
        v = self.v_proj(x).to(wide).view(shape)
        q, k, v = self.blocks(q), self.contexts(k), self.contexts(v)
        K = q.shape[1]
        relative = self.relative_k_proj(positions).view(-1, self.heads, self.head_dim).to(q.dtype)
        queries = q.permute(0, 3, 1, 2, 4)  # [B, H, K, chunk, D]
        content = queries @ k.permute(0, 3, 1, 4, 2)
        by_distance = (queries.reshape(B, self.heads, -1, self.head_dim) @ relative.permute(1, 2, 0)).reshape(B, self.heads, K, self.chunk, -1)
        scores = torch.tanh((content + self.relative_shift(by_distance)) / self.cap) * self.cap
        scores = scores.masked_fill(~mask, self.invalid)
        weights = F.softmax(scores, dim=-1, dtype=wide).to(v.dtype)
        out = (weights @ v.permute(0, 3, 1, 2, 4)).permute(0, 2, 3, 1, 4).reshape(B, K * self.chunk, -1)[:, :T]
        return self.post(out.to(x.dtype))


class FeedForward(nn.Module):
    """A half-step (x 0.5) feed-forward with its own residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.ffw_layer_1 = ClippableLinear(hidden, 4 * hidden, clipped)
        self.ffw_layer_2 = ClippableLinear(4 * hidden, hidden, clipped)
        self.pre_layer_norm = RMSNorm(hidden, 1e-6)
        self.post_layer_norm = RMSNorm(hidden, 1e-6)
        self.clip, self.scale = config.gradient_clipping, config.residual_weight

    def forward(self, x: Tensor) -> Tensor:
        clip = min(self.clip, torch.finfo(x.dtype).max)
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(torch.clamp(x, -clip, clip)))))
        return self.post_layer_norm(torch.clamp(h, -clip, clip)) * self.scale + x


class LightConv1d(nn.Module):
    """GLU, then a causal depthwise convolution over time, norm, SiLU, projection; with a residual."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        hidden, clipped = config.hidden_size, config.use_clipped_linears
        self.linear_start = ClippableLinear(hidden, 2 * hidden, clipped)
        self.linear_end = ClippableLinear(hidden, hidden, clipped)
        self.depthwise_conv1d = nn.Conv1d(hidden, hidden, config.conv_kernel_size, groups=hidden, bias=False)
        self.pre_layer_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.conv_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.clip = config.gradient_clipping

    def forward(self, x: Tensor) -> Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = F.pad(h.transpose(1, 2), (self.depthwise_conv1d.kernel_size[0] - 1, 0))  # causal: only the past
        h = self.depthwise_conv1d(h).transpose(1, 2)
        clip = min(self.clip, torch.finfo(h.dtype).max)
        return self.linear_end(F.silu(self.conv_norm(torch.clamp(h, -clip, clip)))) + x


class AudioLayer(nn.Module):
    def __init__(self, config: AudioConfig):
        super().__init__()
        self.feed_forward1 = FeedForward(config)
        self.feed_forward2 = FeedForward(config)
        self.self_attn = AudioAttention(config)
        self.lconv1d = LightConv1d(config)
        self.norm_pre_attn = RMSNorm(config.hidden_size, 1e-6)
        self.norm_post_attn = RMSNorm(config.hidden_size, 1e-6)
        self.norm_out = RMSNorm(config.hidden_size, 1e-6)
        self.clip = config.gradient_clipping

    def forward(self, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        clip = min(self.clip, torch.finfo(self.norm_pre_attn.weight.dtype).max)
        x = self.feed_forward1(x)
        h = self.self_attn(self.norm_pre_attn(torch.clamp(x, -clip, clip)), positions, mask)
        x = self.norm_post_attn(torch.clamp(h, -clip, clip)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(torch.clamp(x, -clip, clip))


class AudioEncoder(nn.Module):
    """`Gemma4AudioModel`: features [B, T, mels] with mask [B, T] -> ([B, T/4, output dims], valid [B, T/4])."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubsampleConvProjection(config)
        self.layers = nn.ModuleList(AudioLayer(config) for _ in range(config.num_hidden_layers))
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def relative_positions(self, dtype: torch.dtype) -> Tensor:
        """Sinusoids [sin..., cos...] of distances C/2 .. 0 [C/2 + 1, hidden]."""
        c = self.config
        context = c.attention_chunk_size + c.attention_context_left - 1 + c.attention_context_right
        timescales = c.hidden_size // 2
        increment = math.log(10_000.0) / max(timescales - 1, 1)
        inverse = torch.exp(torch.arange(timescales) * -increment)[None]
        scaled = torch.arange(context // 2, -1, -1)[:, None] * inverse
        return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=-1).to(dtype)

    def block_mask(self, valid: Tensor) -> Tensor:
        """[B, 1, K, chunk, C]: a real key at distance 0 .. left-2 behind (or 1 .. right-1 ahead) of its query."""
        c = self.config
        chunk, past, future = c.attention_chunk_size, c.attention_context_left - 1, c.attention_context_right
        B, T = valid.shape
        K = -(-T // chunk)
        queries = torch.arange(K * chunk).view(K, chunk, 1)
        keys = (torch.arange(K) * chunk - past).view(K, 1, 1) + torch.arange(chunk + past + future).view(1, 1, -1)
        distance = queries - keys
        near = ((distance >= 0) & (distance < past)) | ((distance < 0) & (-distance < future))
        inside = (keys >= 0) & (keys < T) & (queries < T)
        real = F.pad(valid.bool(), (0, K * chunk + past + future))[:, keys.clamp(min=0).squeeze(1)]  # [B, K, C]
        return (near & inside)[None] & real[:, :, None, :]

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x, valid = self.subsample_conv_projection(features, mask)
        positions = self.relative_positions(x.dtype)
        blocked = self.block_mask(valid)[:, None]
        for layer in self.layers:
            x = layer(x, positions, blocked)
        return self.output_proj(x), valid.bool()
