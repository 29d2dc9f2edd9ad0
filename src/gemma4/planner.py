"""Know before you load: the bytes the engine will hold for a model, a context and a batch.

Weights come from the checkpoint layout; KV bytes from the same slot rules the cache uses
(`kv_cache.global_capacity`, a ring of `window` slots, nothing for KV-shared layers, one tensor
for K=V), so the plan and the cache's own accounting agree exactly. Each of the architecture's
savings can be switched off to show what it buys."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .config import SLIDING, ModelConfig, TextConfig
from .model.int8_kv import block_size
from .model.rope import KeyRotations
from .parallel.sharding import WHOLE, Shard, cut_of
from .plan import LayerPlan, build_plan
from .runtime.kv_cache import DEFAULT_CHUNK, global_capacity
from .quant.modules import UNPACKED
from .quant.packed import packed_nbytes, prompt_scratch_bytes
from .weights.layout import TensorSpec, checkpoint_tensors

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
KV_SCALE_BYTES = 2  # int8 K/V: an fp16 scale per block of values (model/int8_kv.py)
# Python, PyTorch and gemma4 themselves, resident before any weight: `python -c "import gemma4"` (VmRSS).
RUNTIME_BYTES = 230_000_000
# A loaded tokenizer (the `tokenizers` backend and our maps of its ids), per vocabulary entry and per BPE
# merge: `Tokenizer.from_folder` in a fresh process, then runtime.heap.release_free as a load ends, holds
# 150 MB for the release vocabulary (262,144 tokens, 514,847 merges) and 114 MB for the synthetic
# checkpoints' (262,144 tokens, 308 merges).
TOKENIZER_BYTES_PER_TOKEN, TOKENIZER_BYTES_PER_MERGE = 436, 70
RELEASE_MERGES = 514_847  # the Gemma tokenizer's: planned where a checkpoint's own are not known


@dataclass(frozen=True)
class Savings:
    """The architecture's memory savings; all on is how the engine runs."""

    sliding_bound: bool = True  # sliding layers keep only their window
    kv_sharing: bool = True  # KV-shared layers store nothing
    k_eq_v: bool = True  # K=V layers store one tensor
    ple_on_disk: bool = True  # the per-layer-embedding table stays in its file
    gqa: bool = True  # fewer KV heads than query heads


ALL_ON = Savings()
EACH_OFF = {
    "no sliding bound": replace(ALL_ON, sliding_bound=False),
    "no KV sharing": replace(ALL_ON, kv_sharing=False),
    "no K=V": replace(ALL_ON, k_eq_v=False),
    "PLE in RAM": replace(ALL_ON, ple_on_disk=False),
    "1:1 KV heads": replace(ALL_ON, gqa=False),
}


def tokenizer_bytes(tokens: int, merges: int = RELEASE_MERGES) -> int:
    """Resident bytes of a loaded tokenizer of `tokens` vocabulary entries and `merges` BPE merges."""
    return tokens * TOKENIZER_BYTES_PER_TOKEN + merges * TOKENIZER_BYTES_PER_MERGE


def kv_vector_bytes(head_dim: int, kv_dtype: str) -> int:
    """Bytes of one head's key or value at one position."""
    if kv_dtype == "int8":
        return head_dim + head_dim // block_size(head_dim) * KV_SCALE_BYTES
    return head_dim * DTYPE_BYTES[kv_dtype]


def kv_bytes_by_type(
    plan: tuple[LayerPlan, ...], context: int, batch: int, kv_dtype: str, savings: Savings = ALL_ON, chunk: int = DEFAULT_CHUNK
) -> dict[str, int]:
    """K/V bytes held once `context` tokens are cached, per attention type."""
    held: dict[str, int] = {}
    for p in plan:
        if not p.owns_kv and savings.kv_sharing:
            continue
        if p.is_sliding and savings.sliding_bound:
            slots = min(p.sliding_window, context)  # type: ignore[type-var]
        else:
            slots = global_capacity(context, context, chunk)
        heads = p.num_kv_heads if savings.gqa else p.num_heads
        tensors = 1 if p.k_eq_v and savings.k_eq_v else 2
        held[p.attention_type] = held.get(p.attention_type, 0) + batch * slots * heads * tensors * kv_vector_bytes(p.head_dim, kv_dtype)
    return held


def serving_kv_bytes(
    plan: tuple[LayerPlan, ...], context: int, slots: int, kv_dtype: str, snapshots: int, savings: Savings = ALL_ON
) -> dict[str, int]:
    """K/V bytes of `slots` sequences of up to `context` tokens, each keeping `snapshots` copies
    of its ring buffers (a server's prefix cache rolls back to them)."""
    held = kv_bytes_by_type(plan, context, slots, kv_dtype, savings)
    if snapshots and SLIDING in held:
        held["ring_snapshots"] = snapshots * held[SLIDING]
    return held


def plan_memory(
    config: ModelConfig,
    context: int,
    dtype: str = "bf16",
    kv_dtype: str | None = None,
    batch: int = 1,
    prefill_chunk: int = 512,
    savings: Savings = ALL_ON,
    quant: str | None = None,
    group: int = 0,
    pack_tables: bool = False,
    snapshots: int = 0,
    media: bool = False,
    shard: Shard = WHOLE,
    stored: dict[str, int] | None = None,
    tokenizer: int | None = None,
) -> dict[str, Any]:
    """Bytes by component: weights, KV cache by layer type, prefill activation peak, total resident.

    quant (bf16/int8/int4): matrices and embedding tables packed as `gemma4.load(quant=...)` packs
    them, everything else and the activations in fp32; the PLE table stays as stored (bf16) unless
    pack_tables (a checkpoint saved by `gemma4 quantize`). snapshots: ring-buffer copies each
    sequence keeps (`gemma4 serve` keeps runtime.generate.MAX_MARKS for its prefix cache). media: images,
    video or audio arrive, so the encoders are resident, and one image at the largest budget or a 30 s
    clip is encoded at a time. shard: what one rank holds when the model is split over ranks (its parts
    of the split matrices and of the K/V heads; the rest whole). stored: bytes per tensor as loaded,
    where the checkpoint fixes them (a GGUF file kept in its own types; `quant` names it then). tokenizer: its
    resident bytes where the checkpoint's own is known (`tokenizer_bytes` of its counts), else the release
    tokenizer's for this vocabulary."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}: use bf16, fp16 or fp32")
    if quant:  # packed weights compute in fp32 and keep K/V in fp16 (runtime.engine.Model.configure)
        dtype, kv_dtype = "fp32", kv_dtype or "fp16"
    text = config.text
    width, kv_dtype = DTYPE_BYTES[dtype], kv_dtype or dtype
    plan = build_plan(shard.config(text))
    weights: dict[str, int] = {}
    for spec in checkpoint_tensors(config):
        held = stored[spec.name] if stored and spec.name in stored else _stored_bytes(spec, width, quant, group, pack_tables)
        weights[spec.component] = weights.get(spec.component, 0) + (held // shard.size if _is_split(spec) else held)
    # Encoders stay in the files until media arrive; then they compute in fp32 (fp32 activations) or
    # bf16, their matrices left as released (bf16) either way (weights.checkpoint.load_encoders).
    encoder_width = 4 if dtype == "fp32" else 2
    encoder_bytes = {e: sum(spec.numel * (2 if _is_encoder_matrix(spec) else encoder_width) for spec in checkpoint_tensors(config)
                            if spec.component == e) for e in ("vision", "audio")}
    encoders = weights.pop("vision", 0) + weights.pop("audio", 0)
    if media:
        weights.update({e: n for e, n in encoder_bytes.items() if n})
    ple_table = weights.pop("ple_table", 0)
    # The PLE table stays in its file: a step's rows are read from it with pread (weights/file_rows.py),
    # so none of it is resident here; the chunk's per-layer inputs made from them are activations.
    ple_width = text.num_hidden_layers * (text.hidden_size_per_layer_input or 0)
    ple_resident = 0 if savings.ple_on_disk else ple_table
    kv = serving_kv_bytes(plan, context, batch, kv_dtype, snapshots, savings)
    rotations = key_rotation_bytes(plan, context)
    activations = _prefill_peak(plan, text.hidden_size, ple_width, min(prefill_chunk, context), context, batch, width, kv_dtype != dtype)
    if quant:  # a prefill matmul's own copy: of its rows, for the int4 prompt kernels, or of a dequantized block of the weight
        activations += prompt_scratch_bytes(widest_chunk_values(plan, text, batch * min(prefill_chunk, context)))
    if media:  # encoding comes before the prefill: the larger transient of the two
        activations = max(activations, _encoder_peak(config, encoder_width))
    tokenizer = tokenizer_bytes(text.vocab_size) if tokenizer is None else tokenizer
    resident = RUNTIME_BYTES + tokenizer + sum(weights.values()) + ple_resident + sum(kv.values()) + rotations + activations
    return {
        "context": context,
        "batch": batch,
        "dtype": dtype,
        "quant": quant,
        "kv_dtype": kv_dtype or dtype,
        "weights": weights,
        "ple_table": {"bytes": ple_table, "resident": ple_resident, "on_disk": savings.ple_on_disk},
        "encoders_on_disk": 0 if media else encoders,
        "kv_cache": kv,
        "key_rotations": rotations,
        "activation_peak": activations,
        "runtime": RUNTIME_BYTES,
        "tokenizer": tokenizer,
        "total_resident": resident,
    }


def widest_chunk_values(plan: tuple[LayerPlan, ...], text: TextConfig, chunk: int) -> int:
    """Values of the widest activation a prompt chunk of `chunk` tokens makes whose size the context does
    not change: an MLP intermediate, or the chunk's rows routed to its top-k experts."""
    return max(chunk * max(p.mlp_width for p in plan), chunk * (text.top_k_experts or 0) * text.hidden_size)


def key_rotation_bytes(plan: tuple[LayerPlan, ...], context: int) -> int:
    """The cos and sin rows (fp32) K=V layers keep for their keys' rotated pairs, one per position up
    to the context, in model.rope.KeyRotations' steps: one table per attention type, whatever the batch."""
    growth = KeyRotations.GROWTH
    positions = -(-context // growth) * growth
    pairs = {p.attention_type: p.rope.rotated_pairs for p in plan if p.k_eq_v}
    return sum(2 * 4 * positions * n for n in pairs.values())


def _is_split(spec: TensorSpec) -> bool:
    """Whether ranks each hold a part of this decoder tensor (parallel/sharding.py)."""
    return spec.component in ("attention", "mlp", "experts") and cut_of("model." + spec.name[spec.name.index("layers.") :]) is not None


def _stored_bytes(spec: TensorSpec, width: int, quant: str | None, group: int, pack_tables: bool) -> int:
    if quant is None:
        return spec.numel * width
    if spec.component == "ple_table" and not pack_tables:
        return spec.numel * 2  # left as stored, memory-mapped
    module = spec.name.removesuffix(".weight")
    packed = len(spec.shape) >= 2 and not module.endswith(UNPACKED) and spec.component not in ("vision", "audio")
    return packed_nbytes(spec.shape, quant, group or None) if packed else spec.numel * 4


def _prefill_peak(plan: tuple[LayerPlan, ...], hidden: int, ple_width: int, chunk: int, context: int, batch: int, width: int,
                  widened: bool) -> int:
    """The largest transient of one prefill chunk, plus the chunk's hidden states and per-layer inputs: the attention's
    (the mask over the keys a layer sees, bool, and the fp32 copy PyTorch's CPU flash attention makes of it; the
    keys and values read widened from a narrower cache: 134 MB for an E2B global layer at 32K; the scores
    themselves are tiled, never whole) or the MLP's two intermediate activations."""
    worst = 0
    for p in plan:
        keys = min(p.sliding_window + chunk, context) if p.sliding_window else context
        attention = batch * chunk * keys * (1 + 4) + (2 * batch * p.num_kv_heads * keys * p.head_dim * width if widened else 0)
        mlp = 2 * batch * chunk * p.mlp_width * width
        worst = max(worst, attention, mlp)
    return worst + batch * chunk * (4 * hidden + ple_width) * width


def _is_encoder_matrix(spec: TensorSpec) -> bool:
    """The encoder weights of bias-free linears: they stay bf16 when computing in fp32."""
    return len(spec.shape) == 2 and not spec.name.endswith(("position_embedding_table", "output_proj.weight"))


def _encoder_peak(config: ModelConfig, width: int) -> int:
    """The largest transient of encoding one image at 1120 soft tokens (10,080 patches) or one 30 s
    clip: a layer's hidden states, q/k/v and output, and its MLP's two intermediates; for audio also
    the first convolution's output (1,500 x 64 x its channels, fp32)."""
    peak = 0
    if (v := config.vision) is not None:
        patches = 1120 * v.pooling_kernel_size**2
        attention = patches * (v.hidden_size * 2 + (v.num_attention_heads + 2 * v.num_key_value_heads) * v.head_dim * 2)
        peak = max(peak, (attention + patches * v.intermediate_size * 2) * width)
    if (a := config.audio) is not None:
        frames = 3000 // 2
        peak = max(peak, frames * 64 * a.subsampling_conv_channels[0] * 4, 750 * a.hidden_size * 16 * width)
    return peak


def sweep(config: ModelConfig, contexts: list[int], **kwargs: Any) -> list[dict[str, Any]]:
    limit = config.text.max_position_embeddings
    return [plan_memory(config, c, **kwargs) for c in contexts if c <= limit]


def savings_table(config: ModelConfig, context: int, **kwargs: Any) -> dict[str, int]:
    """Total resident bytes with all savings, then with each switched off in turn."""
    rows = {"as designed": plan_memory(config, context, **kwargs)["total_resident"]}
    for name, savings in EACH_OFF.items():
        rows[name] = plan_memory(config, context, savings=savings, **kwargs)["total_resident"]
    return rows
