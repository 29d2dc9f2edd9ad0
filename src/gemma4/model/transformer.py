"""The Gemma 4 text decoder: embeddings (with per-layer embeddings), the layer stack, tied
and soft-capped logits. Pure tensor math: weights arrive from a loader, caches from the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..config import FULL, SLIDING, TextConfig
from ..plan import LayerPlan, build_plan
from . import one_token as one_token_path
from .layers import AttentionInputs, DecoderLayer, KeyInputs, KVStore, RMSNorm, StoredRows, row_source
from .rope import KeyRotations, rotary_tables


class ScaledEmbedding(nn.Embedding):
    """Embedding times a constant that is cast to the weight dtype first, as the reference does
    (sqrt(1536) is 39.19 in fp32 but 39.25 in bf16)."""

    def __init__(self, num: int, dim: int, scale: float):
        super().__init__(num, dim)
        self.scale = scale
        self.stored_rows: dict[str, StoredRows] = {}  # stand-ins a loader left for `weight`'s lookups (weights/file_rows.py)

    def forward(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        rows = row_source(self.stored_rows, "weight", self.weight)[ids].to(dtype or self.weight.dtype)
        return rows * torch.tensor(self.scale, dtype=rows.dtype, device=rows.device)

    def attend(self, hidden: Tensor) -> Tensor:
        """The tied LM head: hidden states against every embedding row."""
        return F.linear(hidden, self.weight)


class DictKV:
    """K/V for one full forward pass without a cache: keys are this step's tokens."""

    def __init__(self) -> None:
        self.shared: dict[int, tuple[Tensor, Tensor]] = {}

    def begin(self, positions: Tensor) -> dict[str, Tensor]:
        return {t: positions for t in (SLIDING, FULL)}

    def update(self, layer: int, key: Tensor | None, value: Tensor) -> tuple[Tensor | None, Tensor]:
        return key, value

    def share(self, layer: int, key: Tensor, value: Tensor) -> None:
        self.shared[layer] = key, value

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.shared[layer]

    def end(self) -> None:
        self.shared.clear()


def attention_mask(query_pos: Tensor, key_pos: Tensor, window: int | None, query_blocks: Tensor | None = None,
                   key_blocks: Tensor | None = None) -> Tensor:
    """[B, 1, T, S] bool from positions [B, T] and [B, S]; -1 marks padding and empty slots.

    Causal, and within `window` positions (the query itself included) on sliding layers. Tokens
    of one image block (block ids >= 0, equal) also see each other's later tokens. Padding
    queries may look anywhere: their outputs are discarded, and a row with nothing allowed
    would turn into NaNs."""
    distance = query_pos[:, :, None] - key_pos[:, None, :]
    allowed = distance >= 0
    if query_blocks is not None:
        allowed |= (query_blocks[:, :, None] == key_blocks[:, None, :]) & (query_blocks >= 0)[:, :, None]  # type: ignore[index]
    allowed &= (key_pos >= 0)[:, None, :]
    if window is not None:
        allowed &= distance < window
    allowed |= (query_pos < 0)[:, :, None]
    return allowed[:, None]


def key_blocks(query_pos: Tensor, query_blocks: Tensor, key_pos: Tensor) -> Tensor:
    """The block id of each key [B, S]: a key written in this step has its token's block; every
    other key (from the cache) -1. A block is fed within one step, so earlier keys are in none."""
    same = key_pos[:, :, None] == query_pos[:, None, :]  # [B, S, T]
    return torch.where(same.any(-1), (same * query_blocks[:, None, :]).sum(-1), -1)


@dataclass(frozen=True)
class MediaInputs:
    """Soft tokens from the encoders, standing in for the placeholder tokens of images, video frames
    and audio clips (`Gemma4Model.forward` merges them the same way)."""

    embeds: Tensor  # [B, T, hidden]: the soft tokens at placeholder positions (anything elsewhere)
    mask: Tensor  # [B, T] bool: True at placeholder positions
    blocks: Tensor | None = None  # [B, T]: the image block of each token, -1 outside; None: no bidirectional attention

    def part(self, start: int, end: int) -> MediaInputs:
        blocks = None if self.blocks is None else self.blocks[:, start:end]
        return MediaInputs(self.embeds[:, start:end], self.mask[:, start:end], blocks)


class TextModel(nn.Module):
    """`Gemma4TextModel`: token ids -> final normed hidden states."""

    # Tables read one row per token: kept in their stored dtype (and, when loaded, memory-mapped).
    ROW_TABLES = ("embed_tokens_per_layer.weight",)

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.plan: tuple[LayerPlan, ...] = build_plan(config)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.embed_tokens = ScaledEmbedding(config.vocab_size, hidden, hidden**0.5)
        self.ple_dim = config.hidden_size_per_layer_input or 0
        if self.ple_dim:
            n = config.num_hidden_layers
            self.embed_tokens_per_layer = ScaledEmbedding(config.vocab_size_per_layer_input, n * self.ple_dim, self.ple_dim**0.5)
            self.per_layer_model_projection = nn.Linear(hidden, n * self.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(self.ple_dim, eps)
        self.layers = nn.ModuleList(DecoderLayer(p, config) for p in self.plan)
        self.norm = RMSNorm(hidden, eps, offset=config.norm_offset)
        # Layers from here on read others' K/V and store none: prefill runs them only where outputs are needed.
        self.first_shared = next((p.index for p in self.plan if not p.owns_kv), len(self.plan))
        # K=V layers rotate their keys on read: each such attention type's tables, kept between steps (per dtype).
        self.key_rotations: dict[tuple[str, torch.dtype], KeyRotations] = {}
        self.rotates_keys_on_read = {t: any(p.k_eq_v for p in self.plan if p.attention_type == t) for t in (SLIDING, FULL)}

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (packed weights keep their own storage types)."""
        return self.norm.weight.dtype

    def per_layer_inputs(self, ids: Tensor, embeds: Tensor) -> Tensor:
        """PLE: [B, T, layers, ple_dim] = (context projection + token table row) / sqrt(2)."""
        B, T = ids.shape
        n = self.config.num_hidden_layers
        table_rows = self.embed_tokens_per_layer(ids, embeds.dtype).reshape(B, T, n, self.ple_dim)
        context = self.per_layer_model_projection(embeds) * self.config.hidden_size**-0.5
        context = self.per_layer_projection_norm(context.reshape(B, T, n, self.ple_dim))
        return (context + table_rows) * 2.0**-0.5

    def attention_inputs(
        self, positions: Tensor, key_positions: list[dict[str, Tensor]], dtype: torch.dtype, blocks: Tensor | None = None
    ) -> dict[str, AttentionInputs]:
        """RoPE tables and masks once per attention type per step, shared by all its layers.
        key_positions: per store, its key positions per attention type (stores split the rows evenly).
        blocks: image blocks [B, T] that attend both ways, on sliding layers only (global layers stay causal)."""
        inputs = {}
        queries = positions.chunk(len(key_positions))
        query_blocks = blocks.chunk(len(key_positions)) if blocks is not None else [None] * len(key_positions)
        for p in self.plan:
            if p.attention_type in inputs:
                continue
            cos, sin = rotary_tables(p.rope, positions, dtype)
            keys = []
            for rows, row_blocks, held in zip(queries, query_blocks, key_positions):
                held = held[p.attention_type]
                rotations = self._key_rotations(p, dtype).covering(held) if self.rotates_keys_on_read[p.attention_type] else None
                both_ways = row_blocks if p.is_sliding else None
                held_blocks = None if both_ways is None else key_blocks(rows, both_ways, held)
                keys.append(KeyInputs(attention_mask(rows, held, p.sliding_window, both_ways, held_blocks), held, rotations))
            inputs[p.attention_type] = AttentionInputs(cos, sin, tuple(keys))
        return inputs

    def _key_rotations(self, p: LayerPlan, dtype: torch.dtype) -> KeyRotations:
        if (p.attention_type, dtype) not in self.key_rotations:
            self.key_rotations[p.attention_type, dtype] = KeyRotations(p.rope, dtype)
        return self.key_rotations[p.attention_type, dtype]

    def forward(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        kv: KVStore | Sequence[KVStore] | None = None,
        keep: int | None = None,
        media: MediaInputs | None = None,
    ) -> Tensor | None:
        """ids: [B, T] -> final hidden states [B, keep or T, hidden].

        positions: [B, T] (default 0..T-1 in every row; -1 marks left padding).
        kv: a cache to read and extend, or one per row (default: none, attend within `ids`).
        keep: how many trailing positions need outputs. KV-shared layers store nothing, so they
        run on those positions only; with keep=0 they are skipped and None is returned.
        media: soft tokens in place of placeholder tokens (images, video frames, audio)."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        stores = (DictKV(),) if kv is None else tuple(kv) if isinstance(kv, Sequence) else (kv,)
        if len(stores) not in (1, B):
            raise ValueError(f"{len(stores)} caches for a batch of {B}: give one, or one per row")
        if media is not None:  # placeholders look up <pad>, for the PLE table too; the soft tokens replace their embedding
            ids = torch.where(media.mask, self.config.pad_token_id or 0, ids)
        x = self.embed_tokens(ids, self.dtype)
        if media is not None:
            x = torch.where(media.mask[..., None], media.embeds.to(x.dtype), x)
        ple = self.per_layer_inputs(ids, x) if self.ple_dim else None
        key_positions = [store.begin(rows) for store, rows in zip(stores, positions.chunk(len(stores)))]
        inputs = self.attention_inputs(positions, key_positions, x.dtype, None if media is None else media.blocks)
        one_token = T == 1 and x.dtype == torch.float32  # a decode step: its layers as direct kernel calls where they can
        compiled = one_token_path.run_layers(self.layers, x, ple, inputs, stores) if one_token and keep != 0 else None
        x = self._run_layers(x, ple, inputs, stores, keep, one_token) if compiled is None else compiled
        for store in stores:
            store.end()
        if keep == 0:
            return None
        if keep is not None:
            x = x[:, -keep:]
        return self.norm(x)

    def _run_layers(self, x: Tensor, ple: Tensor | None, inputs: dict[str, AttentionInputs], stores: Sequence[KVStore], keep: int | None,
                    one_token: bool) -> Tensor:
        """The layers one by one (a decode step's as direct kernel calls where `bind` takes them); with keep=0
        the KV-shared ones, which store nothing, are skipped."""
        for p, layer in zip(self.plan, self.layers):
            if p.index == self.first_shared and keep is not None:
                if keep == 0:
                    break
                x, inputs = x[:, -keep:], {t: i.last(keep) for t, i in inputs.items()}
                ple = ple[:, -keep:] if ple is not None else None
            per_layer_input = ple[:, :, p.index] if ple is not None else None
            bound = one_token_path.bind(layer, x.shape[0]) if one_token else None
            if bound is not None:
                x = one_token_path.step(layer, bound, x, per_layer_input, inputs[p.attention_type], stores)
            else:
                x = layer(x, per_layer_input, inputs[p.attention_type], stores)
        return x


class CausalLM(nn.Module):
    """`Gemma4ForCausalLM`: token ids -> soft-capped logits, LM head tied to the embeddings."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.kv_dtype: torch.dtype | None = None  # the K/V cache's dtype when it differs from the activations'

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def plan(self) -> tuple[LayerPlan, ...]:
        return self.model.plan

    def head(self, hidden: Tensor) -> Tensor:
        """Hidden states against every vocabulary row: the tied embeddings, or lm_head. (Over several
        ranks, each takes its rows and the parts are gathered: parallel/ranks.py sets its own.)"""
        return self.model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        logits = self.head(hidden)
        if (cap := self.config.final_logit_softcapping) is not None:
            if logits.dtype == torch.float32 and logits.is_contiguous() and kernels.available():
                return kernels.softcap_(logits, cap)  # one pass where PyTorch's operators take three: ~1 ms of a decode step
            logits = logits.div_(cap).tanh_().mul_(cap)  # in place: three vocabulary-sized copies fewer a step
        return logits

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, media: MediaInputs | None = None) -> Tensor:
        """input_ids: LongTensor [B, T] -> logits [B, T, vocab], soft-capped as the reference returns them."""
        return self.logits(self.model(input_ids, media=media))  # type: ignore[arg-type]

    @torch.inference_mode()
    def step(self, ids: Tensor, positions: Tensor, kv: KVStore | Sequence[KVStore], keep: int, media: MediaInputs | None = None) -> Tensor | None:
        """One prefill chunk or decode step against a cache (or one cache per row) -> logits [B, keep, vocab] (None if keep=0)."""
        hidden = self.model(ids, positions, kv, keep, media)
        return None if hidden is None else self.logits(hidden)
