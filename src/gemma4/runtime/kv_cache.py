"""A KV cache built for Gemma 4's layer plan.

- Sliding layers keep a ring buffer of exactly `window` slots: their memory never grows.
- Global layers keep the whole context, in a buffer that grows by doubling from `chunk`
  positions (linear total copying, at most 2x over-allocation, capped at the context).
- KV-shared layers keep nothing: they read their source layer's K/V of the current step.
- K=V layers keep one tensor: the value; keys are rebuilt from it on read.
- K/V are stored in the cache's dtype: 16 or 32 bits, or int8 with a scale per head and position
  (model/int8_kv.py).

Every slot stores the position of its token (-1 when empty or padding), so masks stay right
after the ring wraps around and rows of a batch may be left-padded by different amounts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import FULL, SLIDING
from ..model.int8_kv import Int8Tensor
from ..plan import LayerPlan

if TYPE_CHECKING:
    from ..model import CausalLM

DEFAULT_CHUNK = 256
FP16_MAX = torch.finfo(torch.float16).max


def global_capacity(tokens: int, context: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Slots a global layer holds once `tokens` positions are cached (the planner uses this too)."""
    capacity = chunk
    while capacity < tokens:
        capacity *= 2
    return min(capacity, -(-context // chunk) * chunk) if tokens else 0


KV = Tensor | Int8Tensor


@dataclass
class _LayerKV:
    key: KV | None  # [B, K, slots, D]; None on K=V layers
    value: KV


@dataclass
class CacheSnapshot:
    length: int
    rings: dict[int, _LayerKV]
    ring_positions: Tensor | None
    label: int | None = None  # its name on other ranks, where they mirror this cache (parallel/follow.py)

    def nbytes(self) -> int:
        return sum(t.nbytes for kv in self.rings.values() for t in (kv.key, kv.value) if t is not None)


class ModelCache:
    """The cache of one model for one batch of sequences. Implements `model.layers.KVStore`."""

    def __init__(self, plan: tuple[LayerPlan, ...], batch: int, context: int, dtype: torch.dtype, chunk: int = DEFAULT_CHUNK):
        self.plan = plan
        self.batch = batch
        self.context = context
        self.dtype = dtype
        self.chunk = chunk
        self.length = 0  # token steps written (padding included)
        owners = [p for p in plan if p.owns_kv]
        windows = {p.sliding_window for p in owners if p.is_sliding}
        if len(windows) > 1:
            raise ValueError(f"sliding layers with different windows {sorted(windows)}")
        self.window = min(windows.pop(), context) if windows else 0
        self.types = sorted({p.attention_type for p in owners})
        self.layers: dict[int, _LayerKV] = {}
        # Positions held in each slot, per attention type (every layer of a type shares them).
        self.slot_positions = {t: torch.full((batch, self.window if t == SLIDING else 0), -1) for t in self.types}
        self._owners = {p.index: p for p in owners}
        self._pending: Tensor | None = None
        self._shared: dict[int, tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_model(cls, lm: CausalLM, batch: int, context: int) -> ModelCache:
        """A cache for `lm`, in its K/V dtype; of the kind the model names in `cache_type`, where it
        names one (a model driven from rank 0 mirrors its caches on the other ranks: parallel/follow.py)."""
        make = getattr(lm, "cache_type", None) or cls
        return make(lm.plan, batch, context, lm.kv_dtype or lm.dtype)

    # --- KVStore -----------------------------------------------------------------------
    def begin(self, positions: Tensor) -> dict[str, Tensor]:
        B, T = positions.shape
        if B != self.batch:
            raise ValueError(f"cache holds {self.batch} sequences, step has {B}")
        if self.length + T > self.context:
            raise ValueError(f"{self.length + T} tokens exceed the cache's context of {self.context}")
        self._pending = positions
        keys = {}
        if SLIDING in self.types:
            ring = self.slot_positions[SLIDING]
            if T == 1:  # decode writes into the ring first: the slot it overwrites is out of the window
                ring = ring.clone()
                ring[:, self.length % self.window] = positions[:, 0]
                keys[SLIDING] = ring
            else:  # a chunk sees the ring's filled slots (all of them once it has wrapped), then itself
                keys[SLIDING] = torch.cat((ring[:, : self._ring_filled()], positions), dim=1)
        if FULL in self.types:
            held = self.slot_positions[FULL]
            capacity = global_capacity(self.length + T, self.context, self.chunk)
            if capacity > held.shape[1]:
                held = torch.cat((held, held.new_full((B, capacity - held.shape[1]), -1)), dim=1)
            held[:, self.length : self.length + T] = positions
            self.slot_positions[FULL] = held
            keys[FULL] = held[:, : self.length + T]
        return keys

    def update(self, layer: int, key: Tensor | None, value: Tensor) -> tuple[KV | None, KV]:
        plan = self._owners[layer]
        if layer not in self.layers:
            self.layers[layer] = self._allocate(plan, value.device)
        # A cache narrower than the activations (16-bit K/V beside fp32 compute) stores rounded; `attend` reads it widened.
        key, value = None if key is None else self._narrow(key), self._narrow(value)
        update = self._update_ring if plan.is_sliding else self._update_global
        return update(self.layers[layer], key, value)

    def decode_slots(self, layer: int) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor] | None:
        """For a one-token step, after `begin`, to a caller that writes the new K/V itself (model/one_token.py's
        compiled step): the slots this layer's new key and value go to ([B, K, D] views of its buffers; the key
        None on K=V layers) and all it then attends to ([B, K, S, D]), as `update` stores and returns them. None
        for an int8 cache (its scales are made here)."""
        if self.dtype == torch.int8:
            return None
        plan = self._owners[layer]
        if layer not in self.layers:
            self.layers[layer] = self._allocate(plan, torch.device("cpu"))
        kv = self.layers[layer]
        if plan.is_sliding:  # the whole ring (the mask says which slots hold what)
            slot, end = self.length % self.window, self.window
        else:
            self._grow_to_capacity(kv)
            slot, end = self.length, self.length + 1
        (key_slot, key), (value_slot, value) = ((None, None) if t is None else (t[:, :, slot], t[:, :, :end]) for t in (kv.key, kv.value))
        return key_slot, value_slot, key, value  # type: ignore[return-value]

    def _narrow(self, x: Tensor) -> KV | Tensor:
        """What is written into the buffers: int8 codes and scales; 16 or 32 bits as they come, since a slot's write
        rounds as `.to` does (a 26B-A4B decode step made 55 rounded copies first, ~35 us each: between weight streams
        every operator starts with cold caches; a prompt chunk's ring write rounds first), fp16's saturated rather
        than overflow to inf."""
        if self.dtype == torch.int8:
            return Int8Tensor.quantize(x)
        if self.dtype == torch.float16 and x.dtype != torch.float16:
            return x.clamp(-FP16_MAX, FP16_MAX)
        return x

    def share(self, layer: int, key: Tensor, value: Tensor) -> None:
        self._shared[layer] = key, value

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self._shared[layer]

    def end(self) -> None:
        positions = self._pending
        assert positions is not None, "end() without begin()"
        T = positions.shape[1]
        if SLIDING in self.types:
            slots, last = self._ring_slots(T)
            self.slot_positions[SLIDING][:, slots] = positions[:, -last:]
        self.length += T
        self._pending = None
        self._shared.clear()

    # --- storage -----------------------------------------------------------------------
    def _allocate(self, plan: LayerPlan, device: torch.device) -> _LayerKV:
        slots = self.window if plan.is_sliding else 0
        shape = (self.batch, plan.num_kv_heads, slots, plan.head_dim)
        empty = (lambda: Int8Tensor.zeros(shape)) if self.dtype == torch.int8 else (lambda: torch.zeros(shape, dtype=self.dtype, device=device))
        return _LayerKV(None if plan.k_eq_v else empty(), empty())

    def _ring_filled(self) -> int:
        """Ring slots written so far: slot = position % window, so before it wraps the first `length`
        (a first chunk of 512 attended to 1,536 slots, two thirds of them empty and masked)."""
        return min(self.length, self.window)

    def _ring_slots(self, T: int) -> tuple[Tensor, int]:
        """Slots the last min(T, window) new tokens go to (earlier ones would be overwritten anyway)."""
        last = min(T, self.window)
        return torch.arange(self.length + T - last, self.length + T) % self.window, last

    def _update_ring(self, kv: _LayerKV, key: KV | None, value: KV) -> tuple[KV | None, KV]:
        T = value.shape[2]
        if T == 1:
            slot = self.length % self.window
            kv.value[:, :, slot] = value[:, :, 0]
            if kv.key is not None:
                kv.key[:, :, slot] = key[:, :, 0]  # type: ignore[index]
            return kv.key, kv.value
        key, value = None if key is None else _in_dtype_of(kv.key, key), _in_dtype_of(kv.value, value)  # (index writes and cat need it)
        filled = self._ring_filled()
        full_key = None if kv.key is None else _cat(kv.key[:, :, :filled], key)  # type: ignore[arg-type]
        full_value = _cat(kv.value[:, :, :filled], value)
        slots, last = self._ring_slots(T)
        kv.value[:, :, slots] = value[:, :, -last:]
        if kv.key is not None:
            kv.key[:, :, slots] = key[:, :, -last:]  # type: ignore[index]
        return full_key, full_value

    def _update_global(self, kv: _LayerKV, key: KV | None, value: KV) -> tuple[KV | None, KV]:
        T = value.shape[2]
        end = self.length + T
        self._grow_to_capacity(kv)
        kv.value[:, :, self.length : end] = value
        if kv.key is not None:
            kv.key[:, :, self.length : end] = key
        return (None if kv.key is None else kv.key[:, :, :end]), kv.value[:, :, :end]

    def _grow_to_capacity(self, kv: _LayerKV) -> None:
        """A global layer's buffers grown to the slots `begin` made room for."""
        capacity = self.slot_positions[FULL].shape[1]
        if capacity > kv.value.shape[2]:
            kv.value = _grow(kv.value, capacity)
            kv.key = None if kv.key is None else _grow(kv.key, capacity)

    # --- accounting and reuse ----------------------------------------------------------
    @torch.inference_mode()
    def snapshot(self) -> CacheSnapshot:
        """Copy what rolling back to the current length needs: the ring buffers (global
        layers keep every position, so their slots need no copy)."""
        rings = {
            i: _LayerKV(None if kv.key is None else kv.key.clone(), kv.value.clone())
            for i, kv in self.layers.items()
            if self._owners[i].is_sliding
        }
        positions = self.slot_positions[SLIDING].clone() if SLIDING in self.types else None
        return CacheSnapshot(self.length, rings, positions)

    @torch.inference_mode()
    def restore(self, snapshot: CacheSnapshot) -> None:
        """Roll back to a snapshot taken on this cache (tokens written since are forgotten)."""
        for i, ring in snapshot.rings.items():
            self.layers[i] = _LayerKV(None if ring.key is None else ring.key.clone(), ring.value.clone())
        if snapshot.ring_positions is not None:
            self.slot_positions[SLIDING] = snapshot.ring_positions.clone()
        if FULL in self.types:
            self.slot_positions[FULL][:, snapshot.length :] = -1
        self.length = snapshot.length

    def can_truncate(self, keep: int) -> bool:
        """Whether `truncate(keep)` is exact: no ring slot has been overwritten yet."""
        return keep <= self.length and (SLIDING not in self.types or self.length <= self.window)

    @torch.inference_mode()
    def truncate(self, keep: int) -> None:
        """Forget every position from `keep` on (while no ring has wrapped, slots are positions)."""
        assert self.can_truncate(keep), "a wrapped ring cannot be truncated: restore a snapshot"
        for positions in self.slot_positions.values():
            positions[:, keep:] = -1
        self.length = keep

    def nbytes_by_type(self) -> dict[str, int]:
        """Bytes of K/V tensors held, per attention type (positions bookkeeping excluded)."""
        held: dict[str, int] = defaultdict(int)
        for index, kv in self.layers.items():
            for t in (kv.key, kv.value):
                if t is not None:
                    held[self._owners[index].attention_type] += t.nbytes
        return dict(held)

    def nbytes_by_layer(self) -> dict[int, int]:
        return {
            i: sum(t.nbytes for t in (kv.key, kv.value) if t is not None) for i, kv in self.layers.items()
        }


def _grow(buffer: KV, capacity: int) -> KV:
    shape = (*buffer.shape[:2], capacity, buffer.shape[3])
    grown = Int8Tensor.zeros(shape) if isinstance(buffer, Int8Tensor) else buffer.new_zeros(shape)
    grown[:, :, : buffer.shape[2]] = buffer
    return grown


def _in_dtype_of(buffer: KV, x: KV) -> KV:
    """x rounded to a 16/32-bit buffer's dtype (an int8 cache's K/V already are Int8Tensors)."""
    return x if isinstance(x, Int8Tensor) else x.to(buffer.dtype)


def _cat(cached: KV, new: KV) -> KV:
    return Int8Tensor.cat([cached, new], dim=2) if isinstance(cached, Int8Tensor) else torch.cat((cached, new), dim=2)  # type: ignore[list-item]
