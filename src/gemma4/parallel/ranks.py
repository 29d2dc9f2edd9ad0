"""The ranks one model runs on: torch.distributed's default process group (gloo on CPUs), as
`torchrun` or the caller set it up, and the few collectives the engine needs from it.

Every collective is bounded by the group's timeout, and a failure (a rank that died, or stopped
answering) ends the job with one line naming this rank and what it lost, instead of a hang."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..errors import Gemma4Error
from ..model import CausalLM
from ..quant.modules import PackedModule
from ..quant.packed import PackedTensor
from .sharding import ROWS, Shard

# How long a rank waits in any one collective before the job ends (loading the slowest rank's
# shard happens before the first one, and a prompt's chunk is well within it).
DEFAULT_TIMEOUT = timedelta(seconds=int(os.environ.get("GEMMA4_RANK_TIMEOUT", "300")))


class RankFailure(Gemma4Error):
    """Another rank died or stopped answering: the whole job ends."""


@dataclass
class Ranks:
    """This process's place among `size` ranks, and what it has sent to the others."""

    rank: int
    size: int
    reductions: int = 0  # all-reduces run
    reduced_bytes: int = 0  # bytes of the tensors summed (each rank sends about 2 (size - 1) / size of them)
    gathered_bytes: int = 0  # bytes of logits this rank sent to the others

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    @classmethod
    def start(cls, tp: int) -> Ranks:
        """Join the job torchrun launched (its environment names the rendezvous), over gloo."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise Gemma4Error(f"--tp {tp} runs one process per rank: launch it as `torchrun --nproc-per-node {tp} -m gemma4 ... --tp {tp}`")
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=DEFAULT_TIMEOUT)
        return cls.join(tp)

    @classmethod
    def join(cls, tp: int) -> Ranks:
        """The ranks of the default process group, which must hold exactly `tp` of them."""
        if tp < 1:
            raise Gemma4Error(f"tp={tp}: the degree of tensor parallelism is a number of ranks, at least 1")
        if tp == 1 and not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1)
        if not (dist.is_available() and dist.is_initialized()):
            raise Gemma4Error(
                f"tp={tp} runs one process per rank: launch with `torchrun --nproc-per-node {tp} -m gemma4 ... --tp {tp}`, "
                "or call torch.distributed.init_process_group on every rank before gemma4.load"
            )
        if dist.get_world_size() != tp:
            raise Gemma4Error(f"tp={tp}, but the process group has {dist.get_world_size()} ranks: launch {tp} processes, or pass tp={dist.get_world_size()}")
        return cls(dist.get_rank(), tp)

    # --- collectives ----------------------------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over ranks, in place (every rank gets the same bits)."""
        self.reductions += 1
        self.reduced_bytes += tensor.nbytes
        self._run("summing a layer's output", dist.all_reduce, tensor)
        return tensor

    def gather(self, part: Tensor) -> Tensor:
        """Every rank's `part`, concatenated along the last axis, in rank order."""
        parts = [torch.empty_like(part) for _ in range(self.size)]
        self.gathered_bytes += part.nbytes
        self._run("gathering the logits", dist.all_gather, parts, part.contiguous())
        return torch.cat(parts, dim=-1)

    def agree(self, what: str, value: Any) -> None:
        """Refuse to start unless every rank has the same `value` (say, a checkpoint's fingerprint)."""
        values: list[Any] = [None] * self.size
        self._run(f"comparing {what}", dist.all_gather_object, values, value)
        for rank, other in enumerate(values):
            if other != value:
                raise Gemma4Error(f"rank {rank}'s {what} differs from rank {self.rank}'s: load the same checkpoint with the same options on every rank")

    def seed_alike(self) -> None:
        """Seed every rank's default generator with one seed from rank 0, so sampling without an
        explicit seed draws the same tokens on every rank (their logits are the same bits)."""
        box = [secrets.randbits(63) if self.rank == 0 else None]
        self._run("receiving rank 0's seed", dist.broadcast_object_list, box, 0)
        torch.manual_seed(box[0])

    def _run(self, doing: str, collective: Any, *args: Any) -> None:
        try:
            collective(*args)
        except (RuntimeError, ValueError) as e:  # gloo's errors: DistBackendError (a RuntimeError) and kin
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankFailure(f"rank {self.rank} of {self.size} lost the other ranks while {doing} ({reason}); the job ends") from None

    # --- the model ------------------------------------------------------------------------
    def attach(self, lm: CausalLM) -> None:
        """Sum the partial outputs of this rank's shard over ranks, one all-reduce per block: after
        attention's o_proj, after the MLP's down_proj; in a hybrid MoE layer, the dense branch's and the
        experts' partial sums together, once the experts have run (the layer reads neither before).
        And score this rank's rows of the vocabulary."""
        if self.size == 1:
            return
        for layer in lm.model.layers:
            layer.self_attn.o_proj.register_forward_hook(lambda _module, _args, out: self.sum(out))
            if hasattr(layer, "experts"):
                dense: list[Tensor] = []
                layer.mlp.register_forward_hook(lambda _module, _args, out, dense=dense: dense.append(out))
                layer.experts.register_forward_hook(lambda _module, _args, out, dense=dense: self.sum_both(dense.pop(), out))
            else:
                layer.mlp.down_proj.register_forward_hook(lambda _module, _args, out: self.sum(out))
        lm.head = VocabularyPart(lm, self)  # type: ignore[method-assign]

    def sum_both(self, dense: Tensor, routed: Tensor) -> Tensor:
        """Sum two partial outputs over ranks in one all-reduce: `dense` in place, `routed` returned."""
        both = self.sum(torch.cat((dense.reshape(-1), routed.reshape(-1))))
        dense.copy_(both[: dense.numel()].view_as(dense))
        return both[dense.numel() :].view_as(routed)


class VocabularyPart:
    """The LM head over this rank's rows of the vocabulary (a view of them: the other rows of a mapped
    table are read only by the lookups of their tokens); the ranks' logits gathered."""

    def __init__(self, lm: CausalLM, ranks: Ranks):
        self.head = lm.model.embed_tokens if lm.lm_head is None else lm.lm_head
        self.ranks = ranks
        self._rows: Tensor | PackedTensor | None = None

    @property
    def rows(self) -> Tensor | PackedTensor:
        """This rank's rows, made again when the packed head's settings change (fast math)."""
        packed = self.head.packed("weight") if isinstance(self.head, PackedModule) else None
        if self._rows is None or packed is not None and self._rows.fast_math != packed.fast_math:  # type: ignore[union-attr]
            if packed is not None:
                self._rows = self.ranks.shard.packed_part("the LM head", packed, ROWS)
            else:
                self._rows = self.ranks.shard.part("the LM head", self.head.weight, -2)  # type: ignore[arg-type]
        return self._rows

    def __call__(self, hidden: Tensor) -> Tensor:
        rows = self.rows
        return self.ranks.gather(rows.matmul(hidden) if isinstance(rows, PackedTensor) else F.linear(hidden, rows))


ALONE = Ranks(0, 1)  # a model that runs in one process


def leave() -> None:
    """Close the process group (before exit: a rank torn down mid-connection may abort the others)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fingerprint(path: str | Path) -> str:
    """What identifies a checkpoint without reading its weights: config.json, and each file's
    name, size, and first and last 64 KB (safetensors and GGUF headers sit at the start)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        if not file.is_file():
            continue
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            digest.update(f.read())
    return digest.hexdigest()
