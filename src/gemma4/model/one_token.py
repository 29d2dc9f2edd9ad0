"""A decode step's layers (one new token per row) without the module machinery: all of them in one
compiled call where its caches hand out their slots (`run_layers`: kernels/layer.c's decode_layers,
the new keys and values written straight into the caches), else each layer in two
compiled calls (`step`), one for what comes before attention and one for what comes after, with the
K/V cache and the attention between them here. The same kernels on the same tensors in the modules'
order, so the result equals the modules' bit for bit (tests/test_generate.py). At one token a layer of
E2B int4 is ~1.1 ms of weight streaming; the modules spent ~0.4 ms more around it (nn.Module calls,
shape and dtype checks, views, dispatch, and ~15 PyTorch operators), calling each kernel from Python
still ~0.25 ms, and two calls a layer with the cache written between them ~0.15 ms (E2B int4 decode:
75.2 -> 69.2 ms a step in one call).

A MoE layer takes a third call: its router runs as a module between the attention's output and the
rest, as the modules run it (picks are brittle), and the routed experts run in the last call.

It takes fp32 activations over compiled kernels, layers whose matrices are all packed with a
one-token kernel (experts: int4 tiles), and no layer whose attention, MLP, experts or matrices carry
forward hooks; anything else runs as modules."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import kernels
from .layers import AttentionInputs, DecoderLayer, KeyInputs, KeysOfValues, KVStore, RMSNorm, attend, attend_one_query, one_query_kernel_takes


@dataclass
class _Binding:
    """A layer's kernels.DecodeLayer, and what it was made from: each (dict, key, value) found there
    then, so a reload or a --fast-math switch (which replace those values) makes it stale.

    Both checks run every step for every layer, between weight streams that leave the caches cold:
    as generator expressions they took ~40 us a layer (1.3 ms of a 26B-A4B step), so they iterate in C."""

    layer: kernels.DecodeLayer
    rows: int  # the most rows it takes
    sources: list[tuple[dict, str, object]]
    modules: list[nn.Module]  # whose forward hooks this path would skip
    keep: list[object]  # what the struct points at

    def __post_init__(self) -> None:
        self._wheres, self._keys, self._values = (list(column) for column in zip(*self.sources))
        self._hooks = [hooks for m in self.modules for hooks in (m._forward_hooks, m._forward_pre_hooks)]

    def current(self) -> bool:
        return all(map(operator.is_, map(dict.get, self._wheres, self._keys), self._values))

    def hooked(self) -> bool:
        """Whether a forward hook is now set on one of its modules (their hook dicts are kept: PyTorch adds
        to them in place) or on every module."""
        module = torch.nn.modules.module
        return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(self._hooks)


def bind(layer: DecoderLayer, rows: int) -> kernels.DecodeLayer | None:
    """The layer as one kernels.DecodeLayer for a step of `rows` tokens, or None where this path does
    not take it (hooks, no compiled kernels, a matrix without a one-token kernel)."""
    binding = layer.__dict__.get("_one_token")
    if binding is None or rows > binding.rows or not binding.current():
        binding = layer.__dict__["_one_token"] = _bind(layer, rows)
    if binding is None or rows > binding.rows or binding.hooked():  # (tensor parallelism sums o_proj's and down_proj's outputs over ranks in hooks)
        return None
    return binding.layer


def _bind(layer: DecoderLayer, rows: int) -> _Binding | None:
    attention, mlp, plan = layer.self_attn, layer.mlp, layer.self_attn.plan
    if not kernels.available():
        return None
    modules = {"q": attention.q_proj, "o": attention.o_proj, "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    if plan.owns_kv:
        modules |= {"k": attention.k_proj} if plan.k_eq_v else {"k": attention.k_proj, "v": attention.v_proj}
    if plan.ple_dim:
        modules |= {"ple_gate": layer.per_layer_input_gate, "ple_projection": layer.per_layer_projection}
    norms = {"input": layer.input_layernorm, "q_norm": attention.q_norm, "post_attention": layer.post_attention_layernorm,
             "pre_feedforward": layer.pre_feedforward_layernorm, "post_feedforward": layer.post_feedforward_layernorm}
    if plan.owns_kv:
        norms |= {"k_norm": attention.k_norm}
        if isinstance(attention.v_norm, RMSNorm):
            norms |= {"v_norm": attention.v_norm}
    if plan.ple_dim:
        norms |= {"post_per_layer_input": layer.post_per_layer_input_norm}
    if plan.moe:
        norms |= {"post_feedforward_1": layer.post_feedforward_layernorm_1, "pre_feedforward_2": layer.pre_feedforward_layernorm_2,
                  "post_feedforward_2": layer.post_feedforward_layernorm_2}
    kernels_of = {name: getattr(module, "row_kernel", lambda rows: None)(rows) for name, module in modules.items()}
    experts = _expert_kernels(layer.experts, layer.router.proj.out_features) if plan.moe else {}
    weights = [n.weight for n in norms.values() if n.weight is not None]
    if not all(isinstance(k, kernels.BoundMatmul) for k in kernels_of.values()) or experts is None or any(w.dtype != torch.float32 for w in weights):
        return None
    scalar = layer._buffers.get("layer_scalar")
    if scalar is not None and scalar.dtype != torch.float32:
        return None
    fields = {name: kernel.matrix for name, kernel in (kernels_of | experts).items()}
    fields |= {name: kernels.Norm(kernels._ptr(n.weight), n.eps, n.offset) for name, n in norms.items()}
    struct = kernels.DecodeLayer(
        **fields, hidden=layer.input_layernorm.weight.shape[0], heads=plan.num_heads, kv_heads=plan.num_kv_heads, head_dim=plan.head_dim,
        width=plan.mlp_width, ple_dim=plan.ple_dim or 0, owns_kv=int(plan.owns_kv), v_normed=int("v_norm" in norms),
        k_eq_v=int(plan.k_eq_v), top_k=layer.router.top_k if plan.moe else 0,
        expert_width=experts["experts_down"].matrix.K if experts else 0, layer_scalar=kernels._ptr(scalar),
    )
    packed = [*modules.values(), *([layer.experts] if plan.moe else [])]
    sources = [(m.__dict__, "fast_math", m.__dict__.get("fast_math")) for m in packed]
    sources += [(m._buffers, name, m._buffers.get(name)) for m in packed for name in getattr(m, "packed_names", ("weight",))]
    sources += [(n._parameters, "weight", n._parameters.get("weight")) for n in norms.values()]
    sources += [(layer._buffers, "layer_scalar", scalar)]
    hooked = [layer, attention, mlp, *packed, *([layer.router] if plan.moe else [])]
    return _Binding(struct, rows, sources, hooked, [kernels_of, experts, weights, scalar])


def _expert_kernels(experts: nn.Module, count: int) -> dict[str, kernels.BoundMatmul] | None:
    """The expert stacks bound for layer.c's routed calls, or None where they are not all int4 tiles
    or not all `count` experts are held here (expert parallelism)."""
    if not hasattr(experts, "packed"):  # (quant/modules.py's PackedExperts)
        return None
    packed = {"experts_gate_up": experts.packed("gate_up_proj"), "experts_down": experts.packed("down_proj")}
    if not all(p.routable and p.codes.shape[0] == count for p in packed.values()):
        return None
    return {name: kernels.BoundMatmul("int4", p.shape[-2:], p.codes, p.scales, p.offsets, p.group_size, p.fast_math) for name, p in packed.items()}


def step(layer: DecoderLayer, bound: kernels.DecodeLayer, x: Tensor, per_layer_input: Tensor | None, inputs: AttentionInputs,
         stores: Sequence[KVStore]) -> Tensor:
    """`layer(x, per_layer_input, inputs, stores)` for x fp32 [B, 1, hidden] contiguous (one token per
    row, fp32 rotary tables), the layer bound by `bind`. Between the compiled calls every PyTorch operator
    starts with cold caches (each layer's weight stream evicts them), ~5-20 us each: so few are made here."""
    attention = layer.self_attn
    B = x.shape[0]
    flat = x.view(B, -1)
    q, key, value = kernels.decode_layer_attention_inputs(bound, flat, *inputs.table_rows)
    if len(stores) == 1:  # the whole batch in one cache
        attended = _attend(attention, q, key, value, inputs.keys[0], stores[0])
    else:  # a cache per row (a server's batch of sequences)
        attended = torch.cat([_attend(attention, q[b : b + 1], None if key is None else key[b : b + 1], None if value is None else value[b : b + 1],
                                      keys, store) for b, (keys, store) in enumerate(zip(inputs.keys, stores))])
    attended = attended.view(B, -1)
    ple = None if per_layer_input is None else per_layer_input.reshape(B, -1)
    if not bound.top_k:
        return kernels.decode_layer_rest(bound, flat, attended, ple).view(B, 1, -1)
    residual = kernels.decode_layer_attention_output(bound, flat, attended)
    weights, ids = layer.router.forward(residual)  # (its hooks, if any, kept this layer off this path: see `bind`)
    return kernels.decode_layer_feedforward(bound, residual, (weights.contiguous(), ids.contiguous()), ple).view(B, 1, -1)


def run_layers(layers: Sequence[DecoderLayer], x: Tensor, per_layer_inputs: Tensor | None, inputs: dict[str, AttentionInputs],
               stores: Sequence[KVStore]) -> Tensor | None:
    """All of a decode step's layers in one compiled call (kernels/layer.c's decode_layers), each layer's new
    keys and values written straight into the caches' slots: x fp32 [B, 1, hidden] contiguous -> the last
    layer's output [B, 1, hidden]; per_layer_inputs [B, 1, layers, ple_dim] or None. The same kernels in the
    same order as `step` (the same bits), without ~0.1 ms a layer of Python between them. None where it does
    not take the step, which `step` then runs layer by layer: a cache that does not hand out its slots (an int8
    one), a layer `bind` does not take or one with experts (its router runs as a module)."""
    B = x.shape[0]
    bound = [bind(layer, B) for layer in layers]
    if not all(hasattr(store, "decode_slots") for store in stores) or any(b is None or b.top_k for b in bound):
        return None
    if any(layer.self_attn.plan.head_dim % 8 for layer in layers):  # (the attention kernel's condition)
        return None
    steps = (kernels.StepAttention * (len(layers) * len(stores)))()
    alive: list[object] = []  # what the call reads, held till it returns
    owned: dict[tuple[int, int], tuple[Tensor | None, Tensor, tuple[Tensor, ...] | None]] = {}  # (layer storing K/V, cache): what it attends to
    for i, layer in enumerate(layers):
        attention, plan = layer.self_attn, layer.self_attn.plan
        types = inputs[plan.attention_type]
        cos, sin = types.table_rows
        for j, (store, keys) in enumerate(zip(stores, types.keys)):
            step_attention = steps[i * len(stores) + j]
            if plan.owns_kv:
                slots = store.decode_slots(plan.index)  # type: ignore[attr-defined]
                if slots is None:
                    return None
                key_slot, value_slot, key, value = slots
                rebuilt = None if key is not None else KeysOfValues(value, attention.k_norm.weight, keys.positions, keys.rotations).kernel_tables()
                owned[plan.index, j] = key, value, rebuilt
                step_attention.value_slot, step_attention.value_slot_strides[:] = value_slot.data_ptr(), value_slot.stride()[:2]
                if key_slot is not None:
                    step_attention.key_slot, step_attention.key_slot_strides[:] = key_slot.data_ptr(), key_slot.stride()[:2]
                alive += [key_slot, value_slot]
            key, value, rebuilt = owned[plan.index if plan.owns_kv else plan.kv_source, j]
            step_attention.rows, step_attention.slots, step_attention.kv_kind = value.shape[0], value.shape[2], kernels.KV_KINDS[value.dtype]
            step_attention.value, step_attention.value_strides[:] = value.data_ptr(), value.stride()[:2]
            if key is not None:
                step_attention.key, step_attention.key_strides[:] = key.data_ptr(), key.stride()[:2]
            if rebuilt is not None:
                weight, key_cos, key_sin, positions = rebuilt
                step_attention.key_weight, step_attention.key_cos, step_attention.key_sin = weight.data_ptr(), key_cos.data_ptr(), key_sin.data_ptr()
                step_attention.key_positions, step_attention.rotated_pairs = positions.data_ptr(), key_cos.shape[1]
            allowed = keys.last_query_allowed
            step_attention.allowed, step_attention.cos, step_attention.sin = allowed.data_ptr(), cos.data_ptr(), sin.data_ptr()
            step_attention.scale = plan.attention_scale
            if per_layer_inputs is not None:
                rows = per_layer_inputs[:, 0, plan.index]
                step_attention.per_layer_input, step_attention.per_layer_stride = rows.data_ptr(), rows.stride(0)
            alive += [key, value, rebuilt, allowed, cos, sin]
    return kernels.decode_layers(bound, steps, x.view(B, -1)).view(B, 1, -1)


def _attend(attention: nn.Module, q: Tensor, key: Tensor | None, value: Tensor | None, keys: KeyInputs, store: KVStore) -> Tensor:
    """One store's rows: q [b, heads, D], the new key and value [b, kv_heads, D] (None where the layer
    has none) -> the attention's output [b, heads, D]."""
    key, value = (None if t is None else t[:, :, None] for t in (key, value))  # [b, K, 1, D]
    cached_key, cached_value = attention.cached_kv(key, value, keys, store)
    if one_query_kernel_takes(q, cached_key, cached_value):
        return attend_one_query(q, cached_key, cached_value, keys.last_query_allowed, attention.plan.attention_scale)
    return attend(q[:, None], cached_key, cached_value, keys.mask, attention.plan.attention_scale)[:, 0]
