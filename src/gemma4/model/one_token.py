"""A decode step's layers (one new token per sequence) without the module machinery: each layer's
kernels called directly, on the same tensors and in the same order as `DecoderLayer.forward`, so the
result equals the modules' bit for bit (tests/test_generate.py). At one token a layer of E2B int4 is
~1.1 ms of weight streaming, and the modules spent ~0.4 ms more around it (nn.Module calls, shape
and dtype checks, views, dispatch): this path keeps the kernels and drops most of the rest.

It takes fp32 activations over compiled kernels, layers whose matrices are fp32 `nn.Linear` or
packed with a one-token kernel, and no MoE or K=V layers, nor a layer whose attention, MLP or
matrices carry forward hooks; anything else runs as modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .layers import AttentionInputs, DecoderLayer, KVStore, RMSNorm, attend, gelu_tanh, normed_rotated

Matmul = Callable[[Tensor], Tensor]


def row_matmul(module: nn.Module, rows: int) -> Matmul | None:
    """x fp32 [rows, K] contiguous -> x @ W.T [rows, N], computed as the module computes it for
    `rows` rows; None where that is not one direct call."""
    if type(module) is nn.Linear:
        weight = module.weight
        return (lambda x: F.linear(x, weight)) if module.bias is None and weight.dtype == torch.float32 else None
    kernel = getattr(module, "row_kernel", None)
    return kernel(rows) if kernel is not None else None


def bind(layer: DecoderLayer, rows: int) -> dict[str, Matmul] | None:
    """The layer's matrices as direct calls for a step of `rows` tokens, or None where this path does
    not take the layer (MoE and K=V layers, hooks, no compiled kernels, a matrix without such a call)."""
    attention, mlp, plan = layer.self_attn, layer.mlp, layer.self_attn.plan
    if plan.moe or plan.k_eq_v or not kernels.available():
        return None
    modules = {"q": attention.q_proj, "o": attention.o_proj, "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    if plan.owns_kv:
        modules |= {"k": attention.k_proj, "v": attention.v_proj}
    if plan.ple_dim:
        modules |= {"ple_gate": layer.per_layer_input_gate, "ple_projection": layer.per_layer_projection}
    skipped = [layer, attention, mlp, *modules.values()]  # whose calls this path makes without them: their hooks would not run
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or any(m._forward_hooks or m._forward_pre_hooks for m in skipped):
        return None  # (tensor parallelism sums o_proj's and down_proj's outputs over ranks in hooks)
    bound = {name: row_matmul(module, rows) for name, module in modules.items()}
    return bound if all(m is not None for m in bound.values()) else None  # type: ignore[return-value]


def norm(module: RMSNorm, x: Tensor) -> Tensor:
    return kernels.rms_norm(x, module.weight, module.eps, module.offset)


def step(layer: DecoderLayer, matmul: dict[str, Matmul], x: Tensor, per_layer_input: Tensor | None, inputs: AttentionInputs,
         stores: Sequence[KVStore]) -> Tensor:
    """`layer(x, per_layer_input, inputs, stores)` for x fp32 [B, 1, hidden] contiguous (one token per
    row, fp32 rotary tables), its matrices bound by `bind`."""
    attention, plan = layer.self_attn, layer.self_attn.plan
    B, D = x.shape[0], plan.head_dim
    flat = x.view(B, -1)
    h = norm(layer.input_layernorm, flat)
    q = normed_rotated(attention.q_norm, matmul["q"](h).view(B, 1, -1, D), inputs.cos, inputs.sin)
    if plan.owns_kv:
        key = normed_rotated(attention.k_norm, matmul["k"](h).view(B, 1, -1, D), inputs.cos, inputs.sin).transpose(1, 2)
        value = matmul["v"](h).view(B, 1, -1, D)
        value = (norm(attention.v_norm, value) if isinstance(attention.v_norm, RMSNorm) else value).transpose(1, 2)
    rows = [slice(None)] if len(stores) == 1 else [slice(b, b + 1) for b in range(B)]
    out = []
    for r, keys, store in zip(rows, inputs.keys, stores):
        if plan.owns_kv:
            cached_key, cached_value = store.update(plan.index, key[r], value[r])
            store.share(plan.index, cached_key, cached_value)  # type: ignore[arg-type]
        else:
            cached_key, cached_value = store.read(plan.kv_source)
        out.append(attend(q[r], cached_key, cached_value, keys.mask, plan.attention_scale))  # type: ignore[arg-type]
    attended = (out[0] if len(out) == 1 else torch.cat(out)).view(B, -1)
    flat = flat + norm(layer.post_attention_layernorm, matmul["o"](attended))

    h = norm(layer.pre_feedforward_layernorm, flat)
    h = matmul["down"](gelu_tanh(matmul["gate"](h)) * matmul["up"](h))
    flat = flat + norm(layer.post_feedforward_layernorm, h)

    if per_layer_input is not None:
        gated = gelu_tanh(matmul["ple_gate"](flat)) * per_layer_input.reshape(B, -1)
        flat = flat + norm(layer.post_per_layer_input_norm, matmul["ple_projection"](gated))
    if hasattr(layer, "layer_scalar"):
        flat = flat * layer.layer_scalar
    return flat.view(B, 1, -1)
