"""Modules that hold packed weights in place of nn.Linear, the expert stacks and the embedding
tables, and the one function that swaps them into a model before its weights are loaded.

Each packed parameter `p` becomes buffers `p` (codes), `p_scale` and `p_offset`: the names a
quantized checkpoint stores, so saving is `state_dict()` and loading is `load_state_dict()`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .. import kernels
from ..model.layers import Experts, StoredRows, gelu_tanh, row_source
from ..model.transformer import ScaledEmbedding, TextModel
from . import packed as packing  # STREAMING_MAX_ROWS read at call time, as packed.py reads it (tests set it)
from .packed import DEFAULT_GROUP, PackedTensor, quantize

SUFFIXES = ("", "_scale", "_offset")


class PackedModule(nn.Module):
    """Holds packed parameters by name; `packed(name)` views them as a PackedTensor."""

    dims = 2  # of each packed weight

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.packed_names = names
        self.fast_math = False  # see PackedTensor.fast_math
        for name in names:
            for suffix in SUFFIXES:
                self.register_buffer(name + suffix, None)
        self._views: dict[str, PackedTensor] = {}

    def packed(self, name: str) -> PackedTensor:
        # Made once per set of buffers (loading replaces codes, scales and offsets together) and
        # setting: a decode step calls this ~300 times.
        view = self._views.get(name)
        if view is None or view.codes is not self._buffers[name] or view.fast_math != self.fast_math:
            buffers = [self._buffers[name + suffix] for suffix in SUFFIXES]
            view = PackedTensor.of(*buffers, dims=self.dims)  # type: ignore[misc]
            view = self._views[name] = replace(view, fast_math=self.fast_math)
        return view

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.packed(n).kind}" for n in self.packed_names if getattr(self, n) is not None)


class PackedLinear(PackedModule):
    def __init__(self) -> None:
        super().__init__(("weight",))

    def forward(self, x: Tensor) -> Tensor:
        return self.packed("weight").matmul(x)

    def row_kernel(self, rows: int) -> kernels.BoundMatmul | None:
        """The compiled call `forward` makes for fp32 [rows, K] contiguous, where it makes one."""
        return self.packed("weight").row_kernel(rows)


class PackedExperts(PackedModule):
    dims = 3

    def __init__(self, first: int = 0) -> None:
        super().__init__(("gate_up_proj", "down_proj"))
        self.first = first

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Experts.forward, with each expert's rows computed as a single weight's would be: up to
        STREAMING_MAX_ROWS of them by the one-token kernel, more by the prompt kernel (PackedTensor.routed_matmul),
        each kind of expert in one routed call per projection. The token-expert pairs are sorted by
        expert, so an expert's rows are one slice and each token sums its experts in the loop's order."""
        stacks = [self.packed(name) for name in self.packed_names]
        if not all(p.routable for p in stacks):
            return Experts.forward(self, x, weights, ids)
        experts, order = (ids - self.first).flatten().sort(stable=True)  # by expert, then token
        tokens, share = order // ids.shape[1], weights.flatten()[order]
        held = (experts >= 0) & (experts < stacks[0].codes.shape[0])
        if not held.all():  # (expert parallelism: the others' experts run elsewhere)
            experts, tokens, share = experts[held], tokens[held], share[held]
        out = torch.zeros_like(x)
        if not len(experts):
            return out
        rows = x.float().expand(len(experts), -1).contiguous() if x.shape[0] == 1 else x.float()[tokens]
        streamed = torch.bincount(experts)[experts] <= packing.STREAMING_MAX_ROWS
        count = int(streamed.sum())
        if count in (0, len(experts)):  # one kind, as a decode step's or a long prompt's usually are: no masks (~5 % of either)
            y = self._routed(rows, experts, *stacks, streaming=count > 0)
        else:
            y = torch.empty_like(rows)
            for streaming, mine in ((True, streamed), (False, ~streamed)):
                y[mine] = self._routed(rows[mine].contiguous(), experts[mine].contiguous(), *stacks, streaming=streaming)
        y = y.mul_(share[:, None]).to(out.dtype)  # in place: a long prompt's y is tens of MB
        if x.shape[0] == 1:  # a decode step: one add per expert, in expert order (index_add_ would scatter: ~5 % of a step)
            for row in y:
                out += row
            return out
        return out.index_add_(0, tokens, y)

    def project(self, x: Tensor, name: str, expert: int) -> Tensor:
        """One expert's rows as `forward` computes them: beyond STREAMING_MAX_ROWS by the prompt kernel
        even where a dense weight's prompt keeps PyTorch's matmul (without AVX-512 VNNI)."""
        stack = self.packed(name)
        if stack.routable and x.shape[0] > packing.STREAMING_MAX_ROWS:
            experts = torch.full((x.shape[0],), expert, dtype=torch.int64)
            return stack.routed_matmul(x.float().contiguous(), experts, streaming=False).to(x.dtype)
        return stack[expert].matmul(x)

    @staticmethod
    def _routed(rows: Tensor, experts: Tensor, gate_up_proj: PackedTensor, down_proj: PackedTensor, streaming: bool = True) -> Tensor:
        gate, up = gate_up_proj.routed_matmul(rows, experts, streaming).chunk(2, dim=-1)
        return down_proj.routed_matmul((gelu_tanh(gate) * up).contiguous(), experts, streaming)


class PackedEmbedding(PackedModule):
    """A scaled embedding whose rows are dequantized as they are read; also the tied LM head."""

    def __init__(self, scale: float):
        super().__init__(("weight",))
        self.scale = scale
        self.stored_rows: dict[str, StoredRows] = {}  # stand-ins a loader left for the codes', scales' and offsets' lookups (weights/file_rows.py)

    def forward(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        sources = [row_source(self.stored_rows, name, self._buffers[name]) for name in ("weight" + s for s in SUFFIXES)]
        return self.packed("weight").rows(ids, sources).to(dtype or torch.float32) * self.scale

    def attend(self, hidden: Tensor) -> Tensor:
        return self.packed("weight").matmul(hidden)


def set_fast_math(model: nn.Module, on: bool) -> None:
    """Switch the packed matmuls of `model` to int8-only activations (on) or back."""
    for module in model.modules():
        if isinstance(module, PackedModule):
            module.fast_math = on


@dataclass(frozen=True)
class Scheme:
    """Which weights are packed, how: `kind` for matrices; `tables` for row-read tables
    (None: leave them as stored, e.g. a bf16 PLE table that stays memory-mapped)."""

    kind: str
    group: int = 0
    tables: str | None = None

    def for_module(self, name: str, module: nn.Module) -> str | None:
        if not packable(name, module):
            return None
        return self.tables if name.endswith("embed_tokens_per_layer") else self.kind


# The MoE router stays in full precision: it only picks experts, and picks are brittle.
UNPACKED = "router.proj"


def packable(name: str, module: nn.Module) -> bool:
    """Matrices and embedding tables, but for UNPACKED; a packed twin takes its next tensor (the experts' second) packed too."""
    if isinstance(module, (ScaledEmbedding, Experts, PackedModule)):
        return True
    return isinstance(module, nn.Linear) and module.bias is None and not name.endswith(UNPACKED)


def packed_twin(module: nn.Module) -> PackedModule:
    """The packed module that takes `module`'s place (its buffers still empty)."""
    if isinstance(module, ScaledEmbedding):
        return PackedEmbedding(module.scale)
    return PackedExperts(module.first) if isinstance(module, Experts) else PackedLinear()


def replace_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, replacement)


def pack_modules(model: nn.Module, scheme: Scheme) -> dict[str, tuple[str, int]]:
    """Swap packable modules for packed ones (on the meta device, before loading).
    Returns {parameter name: (kind, group)} for every weight that is now packed."""
    packed: dict[str, tuple[str, int]] = {}
    for name, module in list(model.named_modules()):
        kind = scheme.for_module(name, module)
        if kind is None:
            continue
        group = 0 if kind == "bf16" else scheme.group or DEFAULT_GROUP[kind]
        twin = packed_twin(module)
        replace_module(model, name, twin)
        packed.update({f"{name}.{p}": (kind, group) for p in twin.packed_names})
    return packed


def packed_state(name: str, p: PackedTensor) -> dict[str, Tensor]:
    """The buffers that hold packed parameter `name`: int4 in tiles, but for row-read tables."""
    if not is_row_table(name):
        p = p.as_tiles()
    return {name + s: t for s, t in zip(SUFFIXES, (p.codes, p.scales, p.offsets)) if t is not None}


def is_row_table(name: str) -> bool:
    return name.removeprefix("model.") in TextModel.ROW_TABLES


def pack_state(name: str, weight: Tensor, kind: str, group: int) -> dict[str, Tensor]:
    """The buffers a packed parameter `name` loads from a float weight."""
    return packed_state(name, quantize(weight, kind, group, rows=True))
