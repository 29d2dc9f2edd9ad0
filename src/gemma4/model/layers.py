"""One Gemma 4 decoder layer and its parts. Module and parameter names equal the Hugging Face
checkpoint names, so loading is a prefix strip. Axes: B batch, T queries, S keys, H heads,
K KV heads, D head_dim, E experts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..config import TextConfig
from ..plan import LayerPlan
from .int8_kv import Int8Tensor, widen
from .rope import KeyRotations, apply_rotary


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Gemma 4's weight multiplies directly (`x * w`); Gemma 1-3 scale by
    `x * (1 + w)`, which `offset=1.0` gives. fp32 activations take one fused kernel where it is
    built (a decode step has ~200 norms; as PyTorch operators each costs eight); it sums in
    another order, a difference of round-off."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def fuses(self, x: Tensor) -> bool:
        """Whether the compiled kernels take this norm of x (fp32 activations and weight)."""
        return x.dtype == torch.float32 and kernels.available() and (self.weight is None or self.weight.dtype == torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        if self.fuses(x):
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps, self.offset)
        x32 = x.float()
        # pow(-0.5), as the reference writes it, rather than rsqrt: keeps the round-off identical.
        normed = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            normed = normed * (self.weight.float() + self.offset if self.offset else self.weight.float())
        return normed.type_as(x)


def normed_rotated(norm: RMSNorm, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rotary(norm(x), cos, sin) for x [B, T, H, D]: one fused kernel for fp32 where built."""
    if cos.dtype == torch.float32 and norm.fuses(x):
        return kernels.rms_norm_rotary(x.contiguous(), norm.weight, norm.eps, norm.offset, cos.contiguous(), sin.contiguous())
    return apply_rotary(norm(x), cos, sin)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU's tanh form; fp32 on the compiled kernel where built (as a decode step's layer call computes
    it, kernels/layer.c: a few ulp from PyTorch's, and ~5x faster at a decode step's sizes)."""
    if x.dtype == torch.float32 and kernels.available():
        return kernels.gelu_tanh(x.contiguous())
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class KeyInputs:
    """The keys one store holds for this step: which each query may see, and (K=V layers) their rotation."""

    mask: Tensor  # [b, 1, T, S] bool, True where attention is allowed
    positions: Tensor  # [b, S] int64, the keys' positions (-1: an empty slot)
    rotations: KeyRotations | None  # K=V layers rotate keys on read: their tables, covering `positions`

    def last(self, n: int) -> KeyInputs:
        return replace(self, mask=self.mask[:, :, -n:])

    @cached_property
    def last_query_allowed(self) -> Tensor:
        """[b, S] bool contiguous: the slots the last query may see (a decode step's one query), made
        once a step for all layers of its type."""
        return self.mask[:, 0, -1].contiguous()


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer of one attention type needs for one step, built once per type."""

    cos: Tensor  # [B, T, D] at the query positions (new keys rotate with the same table)
    sin: Tensor
    keys: tuple[KeyInputs, ...]  # one per store: the whole batch's, or one per row

    def last(self, n: int) -> AttentionInputs:
        """The same inputs for the last n queries only."""
        return AttentionInputs(self.cos[:, -n:], self.sin[:, -n:], tuple(k.last(n) for k in self.keys))

    @cached_property
    def table_rows(self) -> tuple[Tensor, Tensor]:
        """cos, sin as [B T, D] contiguous, made once a step for all layers of this type."""
        D = self.cos.shape[-1]
        return self.cos.reshape(-1, D).contiguous(), self.sin.reshape(-1, D).contiguous()


@dataclass(frozen=True)
class KeysOfValues:
    """A K=V layer's keys, never stored: k_norm of the same projection as the values, i.e. the values
    times k_norm's weight, then rotated at the keys' positions."""

    values: Tensor | Int8Tensor  # [b, K, S, D], as cached
    weight: Tensor  # k_norm's [D]
    positions: Tensor  # [b, S] int64 (-1: an empty slot, never attended)
    rotations: KeyRotations

    def kernel_tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the one-query kernel rebuilds each slot's key from: the weight (fp32), the rotation tables
        (cos, sin [positions, rotated pairs]) and the slots' positions [b, S] contiguous."""
        return self.weight.float(), self.rotations.cos, self.rotations.sin, self.positions.contiguous()

    def rebuilt(self, dtype: torch.dtype) -> Tensor:
        """The keys [b, K, S, D], computed in fp32 (as the one-query kernel computes them), then cast."""
        key = widen(self.values, torch.float32) * self.weight.float()
        cos, sin = self.rotations.tables(self.positions.clamp(min=0))
        return apply_rotary(key, cos.unsqueeze(1), sin.unsqueeze(1), head_axis=None).to(dtype)


def attend(q: Tensor, key: Tensor | Int8Tensor | KeysOfValues, value: Tensor | Int8Tensor, mask: Tensor, scale: float) -> Tensor:
    """q [B, T, H, D] against key, value [B, K, S, D] under mask [B, 1, T, S] -> [B, T, H, D].
    K/V may be narrower than q (a 16-bit or int8 cache): read widened. One fp32 query per head (a decode
    step) takes a fused kernel where it is built, which reads a 16-bit cache as it is (and rebuilds a
    K=V layer's keys slot by slot): at E2B's decode shapes PyTorch's attention takes twice as long,
    plus the widening copies."""
    if q.shape[1] == 1 and one_query_kernel_takes(q, key, value):
        return attend_one_query(q[:, 0].contiguous(), key, value, mask[:, 0, 0].contiguous(), scale)[:, None]
    key = key.rebuilt(q.dtype) if isinstance(key, KeysOfValues) else widen(key, q.dtype)
    value = widen(value, q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def one_query_kernel_takes(q: Tensor, key: Tensor | Int8Tensor | KeysOfValues, value: Tensor | Int8Tensor) -> bool:
    """Whether `attend_one_query` takes these: fp32 queries, head_dim a multiple of 8, one kind of K/V it reads."""
    fused_kv = isinstance(key, KeysOfValues) or key.dtype == value.dtype
    return q.shape[-1] % 8 == 0 and q.dtype == torch.float32 and fused_kv and value.dtype in kernels.KV_KINDS and kernels.available()


def attend_one_query(q: Tensor, key: Tensor | Int8Tensor | KeysOfValues, value: Tensor | Int8Tensor, allowed: Tensor, scale: float) -> Tensor:
    """`attend` of one query per row, in the fused kernel: q [B, H, D] contiguous, allowed [B, S] bool
    contiguous -> [B, H, D]."""
    if isinstance(key, KeysOfValues):
        return kernels.attend_one_query(q, value, value, allowed, scale, key.kernel_tables())
    return kernels.attend_one_query(q, key, value, allowed, scale)


class KVStore(Protocol):
    """Where layers that own K/V keep them, and where KV-shared layers find them.

    The engine calls `begin` once per step, before any layer, and `end` once after. A batch
    has one store, or one per row (rows that are separate sequences with caches of their own,
    as a server batches them): projections then run over the whole batch, attention row by row."""

    def begin(self, positions: Tensor) -> dict[str, Tensor]:
        """positions: [B, T] of the new tokens (-1 for padding) -> key positions [B, S] per attention type."""
        ...

    def update(self, layer: int, key: Tensor | None, value: Tensor) -> tuple[Tensor | None, Tensor]:
        """Add the new tokens' K/V [B, K, T, D] (key None for K=V layers); return all of them
        [B, K, S, D], in the store's dtype (`attend` widens)."""
        ...

    def share(self, layer: int, key: Tensor, value: Tensor) -> None: ...

    def read(self, layer: int) -> tuple[Tensor, Tensor]: ...

    def end(self) -> None: ...


class Attention(nn.Module):
    def __init__(self, plan: LayerPlan, hidden: int, eps: float, bias: bool, norm_offset: float = 0.0):
        super().__init__()
        self.plan = plan
        q_width, kv_width = plan.num_heads * plan.head_dim, plan.num_kv_heads * plan.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=bias)
        self.q_norm = RMSNorm(plan.head_dim, eps, offset=norm_offset)
        if plan.owns_kv:  # KV-shared layers have no k/v weights at all
            self.k_proj = nn.Linear(hidden, kv_width, bias=bias)
            self.v_proj = None if plan.k_eq_v else nn.Linear(hidden, kv_width, bias=bias)
            self.k_norm = RMSNorm(plan.head_dim, eps, offset=norm_offset)
            self.v_norm = RMSNorm(plan.head_dim, eps, with_scale=False) if plan.v_norm else nn.Identity()
        self.o_proj = nn.Linear(q_width, hidden, bias=bias)

    def forward(self, x: Tensor, inputs: AttentionInputs, stores: Sequence[KVStore]) -> Tensor:
        B, T, _ = x.shape
        D = self.plan.head_dim
        q = normed_rotated(self.q_norm, self.q_proj(x).view(B, T, -1, D), inputs.cos, inputs.sin)
        new_key, new_value = self._project_kv(x, inputs) if self.plan.owns_kv else (None, None)
        rows = [slice(None)] if len(stores) == 1 else [slice(b, b + 1) for b in range(B)]
        out = [
            self._attend_store(q[r], None if new_key is None else new_key[r], None if new_value is None else new_value[r], keys, store)
            for r, keys, store in zip(rows, inputs.keys, stores)
        ]
        return self.o_proj((out[0] if len(out) == 1 else torch.cat(out)).reshape(B, T, -1))

    def _project_kv(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor | None, Tensor]:
        """The new tokens' keys (None on K=V layers) and values, [B, K, T, D]."""
        B, T, _ = x.shape
        raw = self.k_proj(x).view(B, T, -1, self.plan.head_dim)
        if self.v_proj is None:
            return None, self.v_norm(raw).transpose(1, 2)  # K=V: the value is v_norm(k_proj(x))
        key = normed_rotated(self.k_norm, raw, inputs.cos, inputs.sin).transpose(1, 2)
        value = self.v_norm(self.v_proj(x).view(B, T, -1, self.plan.head_dim)).transpose(1, 2)
        return key, value

    def _attend_store(self, q: Tensor, new_key: Tensor | None, new_value: Tensor | None, keys: KeyInputs, kv: KVStore) -> Tensor:
        key, value = self.cached_kv(new_key, new_value, keys, kv)
        # Gemma 4 scales by 1.0: q_norm and k_norm take the place of 1/sqrt(D).
        return attend(q, key, value, keys.mask, self.plan.attention_scale)

    def cached_kv(self, new_key: Tensor | None, new_value: Tensor | None, keys: KeyInputs, kv: KVStore) -> tuple[Tensor | KeysOfValues, Tensor]:
        """All keys and values this layer attends to, [b, K, S, D], the new tokens' among them (where it owns K/V)."""
        if not self.plan.owns_kv:
            return kv.read(self.plan.kv_source)
        key, value = kv.update(self.plan.index, new_key, new_value)  # type: ignore[arg-type]
        if new_key is None:  # K=V: one tensor is stored, keys are rebuilt on read
            key = KeysOfValues(value, self.k_norm.weight, keys.positions, keys.rotations)  # type: ignore[arg-type]
        kv.share(self.plan.index, key, value)  # type: ignore[arg-type]
        return key, value  # type: ignore[return-value]


class MLP(nn.Module):
    """GeGLU with tanh-GELU."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class StoredRows(Protocol):
    """A tensor's rows kept where a loader found them (weights/file_rows.py: in the checkpoint's file)."""

    def stands_in_for(self, tensor: Tensor) -> bool: ...

    def __getitem__(self, ids: Tensor) -> Tensor: ...


def row_source(stand_ins: dict[str, StoredRows], name: str, tensor: Tensor) -> Tensor | StoredRows:
    """What the rows of a module's tensor `name` are looked up in: the stand-in a loader left for it while
    the tensor is still the one it stands in for, unwritten; else the tensor itself."""
    rows = stand_ins.get(name)
    return rows if rows is not None and rows.stands_in_for(tensor) else tensor


class Router(nn.Module):
    COMPILED_ROWS = 8  # rows up to which the compiled router runs (beyond, PyTorch's matmul is faster)

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k = top_k
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [N, hidden] -> (weights [N, top_k] fp32, expert ids [N, top_k]). A decode step's few fp32
        rows take one compiled call where it is built (the same math, sums in another order): as ten
        operators they were ~7 % of a 26B-A4B step."""
        scale, proj, per_expert_scale = self.scale, self.proj.weight, self.per_expert_scale
        if x.shape[0] <= self.COMPILED_ROWS and all(t.dtype == torch.float32 for t in (x, scale, proj, per_expert_scale)) and kernels.available():
            return kernels.route(x.contiguous(), scale.contiguous(), x.shape[-1] ** -0.5, proj.contiguous(), per_expert_scale.contiguous(),
                                 self.top_k, self.norm.eps)
        scores = self.proj(self.norm(x) * self.scale * x.shape[-1] ** -0.5)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    """The experts as two 3-D tensors, as checkpoints store them: all of them, or (expert parallelism)
    the `num_experts` from `first` on, where tokens routed elsewhere contribute nothing here."""

    def __init__(self, num_experts: int, hidden: int, width: int, first: int = 0):
        super().__init__()
        self.first = first
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))  # [E, 2I, hidden]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))  # [E, hidden, I]

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """x: [N, hidden]; each token runs only its top-k experts (those held here)."""
        out = torch.zeros_like(x)
        held = range(self.first, self.first + self.gate_up_proj.shape[0])
        for expert in ids.unique().tolist():
            if expert not in held:
                continue
            token, slot = torch.where(ids == expert)
            gate, up = self.project(x[token], "gate_up_proj", expert - self.first).chunk(2, dim=-1)
            y = self.project(gelu_tanh(gate) * up, "down_proj", expert - self.first) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def project(self, x: Tensor, name: str, expert: int) -> Tensor:
        return F.linear(x, getattr(self, name)[expert])


class DecoderLayer(nn.Module):
    def __init__(self, plan: LayerPlan, config: TextConfig):
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.self_attn = Attention(plan, hidden, eps, config.attention_bias, offset)
        self.mlp = MLP(hidden, plan.mlp_width)
        self.input_layernorm = RMSNorm(hidden, eps, offset=offset)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=offset)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset=offset)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset=offset)
        if config.has_layer_scalar:
            self.register_buffer("layer_scalar", torch.ones(1))
        num_experts, top_k, expert_width = config.num_experts or 0, config.top_k_experts or 0, config.moe_intermediate_size or 0
        if plan.moe:  # hybrid MoE: the routed experts run beside the dense MLP
            self.router = Router(hidden, num_experts, top_k, eps)
            self.experts = Experts(num_experts, hidden, expert_width)
            self.post_feedforward_layernorm_1 = RMSNorm(hidden, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(hidden, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(hidden, eps)
        if plan.ple_dim:
            self.per_layer_input_gate = nn.Linear(hidden, plan.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(plan.ple_dim, hidden, bias=False)
            self.post_per_layer_input_norm = RMSNorm(hidden, eps)

    def forward(self, x: Tensor, per_layer_input: Tensor | None, inputs: AttentionInputs, stores: Sequence[KVStore]) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), inputs, stores))

        residual = x
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if hasattr(self, "experts"):
            flat = residual.reshape(-1, residual.shape[-1])  # router and experts read the pre-MLP residual
            weights, ids = self.router(flat)
            routed = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids).reshape(residual.shape)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed)
        x = residual + self.post_feedforward_layernorm(h)

        if per_layer_input is not None:
            gated = gelu_tanh(self.per_layer_input_gate(x)) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar if hasattr(self, "layer_scalar") else x
