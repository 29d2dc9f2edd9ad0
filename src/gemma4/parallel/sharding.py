"""Which part of each weight a rank holds, under tensor parallelism over `size` ranks.

- Attention splits by KV-head groups: a rank holds whole KV heads and the query heads that read
  them, so q/k/v projections split by rows, o_proj by columns, and each rank's K/V cache holds
  only its own heads. Every layer's KV heads must divide by the degree (E2B's single KV head
  does not split at all).
- MLPs (and the 26B-A4B's dense branch) split gate/up by rows, down by columns.
- The 26B-A4B's experts spread over ranks whole (expert parallelism): rank r holds a contiguous
  run of E/size experts and runs the tokens routed to them; the router is replicated, so every
  rank knows every token's choice and no token moves before the sum.
- The LM head splits by vocabulary: each rank scores its rows and the logits are gathered (a
  decode step reads 1/N of the tied embeddings instead of all of them, for 4 bytes a row sent).
- Everything else (the embedding lookup, the PLE table and projections, norms, the router) is
  replicated: rows of the tables are read per token, and small matrices cost less copied than
  communicated.

Row and column parts of o_proj and down_proj add up to the full product: the engine sums them
over ranks, one all-reduce after attention and one after the MLP (a hybrid MoE layer's dense
branch and experts together)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..config import TextConfig
from ..errors import ConfigError
from ..quant import int4
from ..quant.modules import SUFFIXES
from ..quant.packed import PackedTensor

ROWS, COLUMNS, EXPERTS, FIRST_RANK = "rows", "columns", "experts", "first rank"
AXIS = {ROWS: -2, COLUMNS: -1, EXPERTS: 0}  # of a weight [experts..., N, K]

# Module of a layer -> how its weight splits.
_CUTS = {
    "self_attn.q_proj": ROWS,
    "self_attn.k_proj": ROWS,
    "self_attn.v_proj": ROWS,
    "self_attn.o_proj": COLUMNS,
    "mlp.gate_proj": ROWS,
    "mlp.up_proj": ROWS,
    "mlp.down_proj": COLUMNS,
    "experts": EXPERTS,
}


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`."""

    rank: int
    size: int

    def config(self, text: TextConfig) -> TextConfig:
        """This rank's decoder config: its share of heads and MLP width (the expert count stays whole:
        the router scores all experts); refused with a clear error where the model does not split."""
        if self.size == 1:
            return text
        kv_heads = {text.layer_kv_heads(i) for i in range(text.num_hidden_layers)}
        parts = {f"query heads ({text.num_attention_heads})": text.num_attention_heads, f"MLP width ({text.intermediate_size})": text.intermediate_size}
        parts |= {f"KV heads of a layer ({k})": k for k in kv_heads}
        if text.enable_moe_block:
            parts[f"experts ({text.num_experts})"] = text.num_experts or 0
        for what, count in parts.items():
            if count % self.size:
                degrees = [n for n in range(1, max(parts.values()) + 1) if all(c % n == 0 for c in parts.values())]
                raise ConfigError(
                    f"tensor parallelism over {self.size} ranks: {what} cannot be split {self.size} ways; "
                    f"this model splits over {', '.join(map(str, degrees))} ranks"
                )
        per_layer = {
            i: {**o, "num_key_value_heads": o["num_key_value_heads"] // self.size} if "num_key_value_heads" in o else o
            for i, o in text.per_layer_config.items()
        }
        return replace(
            text,
            num_attention_heads=text.num_attention_heads // self.size,
            num_key_value_heads=text.num_key_value_heads // self.size,
            intermediate_size=text.intermediate_size // self.size,
            per_layer_config=per_layer,
        )

    def experts(self, text: TextConfig) -> tuple[int, int]:
        """(first, count) of the experts this rank holds."""
        count = (text.num_experts or 0) // self.size
        return self.rank * count, count

    def cut(self, name: str, tensor: Tensor) -> Tensor:
        """This rank's part of float weight `name` (our parameter name): a view of whole rows (still in the
        memory map), else a copy (a column part read in place would touch every row's pages)."""
        how = cut_of(name)
        if how is None or self.size == 1:
            return tensor
        if how == FIRST_RANK:
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        axis = AXIS[how] if tensor.dim() > 1 else -1
        return self.part(name, tensor, axis)

    def cut_packed(self, name: str, p: PackedTensor) -> PackedTensor:
        """This rank's part of packed weight `name`, cut along whole blocks (int4 tiles of 8 rows,
        groups of columns), so it equals that part of the whole's quantization, bit for bit."""
        how = cut_of(name)
        if how is None or self.size == 1:
            return p
        return self.packed_part(name, p, how)

    def packed_part(self, name: str, p: PackedTensor, how: str) -> PackedTensor:
        """This rank's part of packed weight `name`, split `how` (ROWS, COLUMNS or EXPERTS)."""
        N, K = p.shape[-2:]
        if how == EXPERTS:
            axis, scale_axis = 0, 0
        elif how == ROWS:  # int4 tiles: codes [..., N/8, K/32, 128], scales [..., N/8, G, 8]
            if p.tiled:
                self._check(name, N, int4.TILE_ROWS, "rows", "int4 tiles of 8 rows")
            axis = scale_axis = -3 if p.tiled else -2
        else:
            per_row = p.group in (0, K)  # one scale per row: every part keeps it whole
            if not per_row:
                self._check(name, K, p.group, "columns", f"groups of {p.group}")
            if p.kind == "int4":
                self._check(name, K, 32, "columns", "int4 blocks of 32")
            axis = -2 if p.tiled else -1
            scale_axis = None if per_row else axis
        part = lambda t, at: t if t is None or at is None else self.part(name, t, at)  # noqa: E731
        return replace(p, codes=part(p.codes, axis), scales=part(p.scales, scale_axis), offsets=part(p.offsets, scale_axis))

    def part(self, name: str, t: Tensor, axis: int) -> Tensor:
        """This rank's 1/size of `t` along `axis`: a view where it is contiguous, else a copy."""
        if t.shape[axis] % self.size:
            _indivisible(name, t.shape[axis], self.size)
        return t.chunk(self.size, axis)[self.rank].contiguous()

    def _check(self, name: str, whole: int, unit: int, what: str, units: str) -> None:
        if (whole // self.size) % unit:
            raise ConfigError(
                f"tensor parallelism over {self.size} ranks: {name} would split into {whole // self.size} {what} per rank, "
                f"not whole {units}; use fewer ranks (or quantize with smaller groups)"
            )


WHOLE = Shard(0, 1)  # the one rank of a model that runs alone


def cut_of(name: str) -> str | None:
    """How parameter `name` (ours: model.layers.3.mlp.down_proj.weight) splits; None: replicated."""
    parts = name.split(".")
    if len(parts) < 5 or parts[1] != "layers":
        return None
    module = ".".join(parts[3:-1])
    how = _CUTS.get(module)
    if how == COLUMNS and parts[-1] == "bias":
        return FIRST_RANK  # a bias of a summed product is added once
    return how


def held_bytes(lm: nn.Module) -> dict[str, int]:
    """Bytes of weights a model (or a rank's part of one) holds: in tensors split over ranks, and replicated."""
    held = {"split": 0, "replicated": 0}
    for name, tensor in lm.state_dict().items():
        for suffix in SUFFIXES[1:]:  # a packed weight's scales and offsets split with it
            name = name.removesuffix(suffix)
        held["split" if cut_of(name) else "replicated"] += tensor.nbytes
    return held


def _indivisible(name: str, size: int, ranks: int) -> Tensor:
    raise ConfigError(f"tensor parallelism over {ranks} ranks: {name} has {size} rows or columns, which do not split {ranks} ways")

