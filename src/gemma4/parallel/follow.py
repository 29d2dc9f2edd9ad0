"""Rank 0 drives, the other ranks follow: how a server (or any command) that lives on rank 0 runs a
model split over several ranks.

Rank 0 runs the interface as if the model were whole. Each time it calls the decoder, the call
(token ids, positions, which caches, media soft tokens) goes first to the other ranks as an order,
and they make the same call on their parts, so their all-reduces (and the LM head's gather) meet
rank 0's. Their caches mirror rank 0's: every cache rank 0 makes is a `MirroredCache`, whose
rollbacks (truncate, snapshot, restore) and end of life travel with the next order. Followers
sample nothing: they score their rows of the vocabulary, and rank 0 alone turns logits into tokens.

Orders travel on a process group of their own, without a timeout: a server may sit idle for
days. A rank 0 that exits sends a last order that ends the others; one that dies closes its
connections, which ends them too (and torchrun ends the job)."""

from __future__ import annotations

import inspect
import itertools
import threading
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model import CausalLM, TextModel
from ..runtime.kv_cache import DEFAULT_CHUNK, CacheSnapshot, ModelCache
from .ranks import Ranks, RankFailure

FOREVER = timedelta(days=365)
STOP = "stop"  # rank 0's last order
_DECODER_ARGS = inspect.signature(TextModel.forward)


@dataclass
class Orders:
    """The channel from rank 0 to the others: cache housekeeping queued until the next call."""

    ranks: Ranks
    group: Any = None
    pending: list[tuple] = field(default_factory=list)
    ids: itertools.count = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=FOREVER)

    def queue(self, *op: Any) -> None:
        self.pending.append(op)  # list.append is atomic: finalizers may call this from any thread

    def send(self, call: tuple | str) -> None:
        with self.lock:
            ops, self.pending = self.pending, []
            self._broadcast((ops, call))

    def receive(self) -> tuple[list[tuple], tuple | str]:
        return self._broadcast(None)

    def _broadcast(self, order: Any) -> Any:
        box = [order]
        try:
            dist.broadcast_object_list(box, 0, group=self.group)
        except (RuntimeError, ValueError) as e:
            raise RankFailure(f"rank {self.ranks.rank} of {self.ranks.size} lost rank 0 ({str(e).strip().splitlines()[0]}); the job ends") from None
        return box[0]


class MirroredCache(ModelCache):
    """A cache on rank 0 whose twins on the other ranks do what it does."""

    def __init__(self, orders: Orders, plan: Any, batch: int, context: int, dtype: torch.dtype, chunk: int = DEFAULT_CHUNK):
        super().__init__(plan, batch, context, dtype, chunk)
        self.orders, self.id = orders, next(orders.ids)
        orders.queue("new", self.id, batch, context, dtype, chunk)
        weakref.finalize(self, orders.queue, "free", self.id)

    def snapshot(self) -> CacheSnapshot:
        snapshot = super().snapshot()
        snapshot.label = next(self.orders.ids)
        self.orders.queue("snapshot", self.id, snapshot.label)
        weakref.finalize(snapshot, self.orders.queue, "free", snapshot.label)
        return snapshot

    def restore(self, snapshot: CacheSnapshot) -> None:
        super().restore(snapshot)
        self.orders.queue("restore", self.id, snapshot.label)

    def truncate(self, keep: int) -> None:
        super().truncate(keep)
        self.orders.queue("truncate", self.id, keep)


class Leader:
    """Rank 0's side: sends every decoder call to the followers before making it."""

    def __init__(self, lm: CausalLM, ranks: Ranks):
        self.orders = Orders(ranks)
        lm.cache_type = lambda *args, **kwargs: MirroredCache(self.orders, *args, **kwargs)  # type: ignore[attr-defined]
        lm.model.register_forward_pre_hook(self._send_call, with_kwargs=True)

    def _send_call(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _DECODER_ARGS.bind(decoder, *args, **kwargs)
        call.apply_defaults()
        kv = call.arguments["kv"]
        stores = [] if kv is None else list(kv) if isinstance(kv, (list, tuple)) else [kv]
        if any(not isinstance(s, MirroredCache) for s in stores):
            raise RuntimeError("a model split over ranks runs only on caches it made (ModelCache.for_model)")
        a = call.arguments
        self.orders.send((a["ids"], a["positions"], None if kv is None else [s.id for s in stores], a["keep"], a["media"]))

    def close(self) -> None:
        """End the followers (they return from `follow`); where they are gone already, nothing to do."""
        try:
            self.orders.send(STOP)
        except RankFailure:
            pass


def follow(lm: CausalLM, ranks: Ranks) -> None:
    """The other ranks' side: repeat rank 0's decoder calls on this rank's part, until rank 0 closes."""
    orders = Orders(ranks)
    caches: dict[int, ModelCache] = {}
    snapshots: dict[int, CacheSnapshot] = {}
    while True:
        ops, call = orders.receive()
        for op, *args in ops:
            if op == "new":
                cache_id, batch, context, dtype, chunk = args
                caches[cache_id] = ModelCache(lm.plan, batch, context, dtype, chunk)
            elif op == "free":
                caches.pop(args[0], None)
                snapshots.pop(args[0], None)
            elif op == "snapshot":
                snapshots[args[1]] = caches[args[0]].snapshot()
            elif op == "restore":
                caches[args[0]].restore(snapshots[args[1]])
            elif op == "truncate":
                caches[args[0]].truncate(args[1])
        if call == STOP:
            return
        ids, positions, kv, keep, media = call
        with torch.inference_mode():  # as CausalLM.step and forward do: the decoder, then the LM head (whose rows are split)
            hidden = lm.model(ids, positions, None if kv is None else [caches[i] for i in kv], keep, media)
            if hidden is not None:
                lm.logits(hidden)
