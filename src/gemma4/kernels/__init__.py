"""The compiled kernels, loaded with ctypes: matmuls over packed weights (matmul.c, int4.c), the
small fused operations of a decode step (decode.c), GGUF blocks into packed layouts (gguf.c), the
int4 quantizers (quantize.c), a memory bandwidth probe (bandwidth.c).

The shared library is built by the package's install step (setup.py). Where it is missing (no
compiler, or a source checkout never built), `available()` is False and callers use PyTorch
instead: PackedTensor dequantizes into a dense matmul, the model runs its own operators. Slower,
the same math."""

from __future__ import annotations

import ctypes
import importlib.machinery
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..model.int8_kv import Int8Tensor

_HERE = Path(__file__).parent


def _load() -> ctypes.CDLL | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"_kernels{suffix}"
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


_lib = _load()


def available() -> bool:
    return _lib is not None


def _ptr(t: Tensor | None) -> int:
    """A tensor's address for a c_void_p argument (ctypes converts an int; a null pointer for None)."""
    return t.data_ptr() if t is not None else 0


MATRIX_KINDS = {"bf16": 0, "f16": 1, "int8": 2, "int4": 3, "q6_k": 4}  # layer.c's enum


class Matrix(ctypes.Structure):
    """layer.c's Matrix: one packed weight, as the kernels take it."""

    _fields_ = [("kind", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("group", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("offsets", ctypes.c_void_p),
                ("f16_values", ctypes.c_int64), ("fast", ctypes.c_int64)]


class BoundMatmul:
    """x fp32 [M, K] contiguous, M <= 8 -> x @ W.T fp32 [M, N], for one packed weight W (quant/packed.py),
    its pointers and sizes converted once: a decode step makes ~300 such calls, and converting them
    per call cost ~5 us each (a small matmul: 17.6 -> 13 us).
      bf16 / f16: codes [N, K].
      int8: codes [N, K]; scales/offsets fp32 [N, K/group].
      int4 tiles (quant/int4.py): codes [N/8, K/32, 128]; scales/offsets fp16 or fp32 [N/8, K/group, 8]
        (no offsets: the Q4_0 grid, w = scale (code - 8)).
      q6_k: GGUF Q6_K blocks [N, K / 256 * 210] (quant/q6_k.py).
    int8 in groups of 32s, q6_k and int4 run on integer products over x rounded to two int8 halves (exact to
    ~1e-5 of each 32 values' largest); `fast` keeps only the high half, as llama.cpp does (changes answers).
    `shape` is W's [N, K] (PackedTensor.shape). Holds the tensors it points at. (An int4 stack of
    experts, codes [E, N/8, K/32, 128], binds as one expert's matrix: layer.c's routed calls find the others.)"""

    def __init__(self, kind: str, shape: tuple[int, int], codes: Tensor, scales: Tensor | None, offsets: Tensor | None, group: int, fast: bool):
        assert _lib is not None
        self.tensors = (codes, scales, offsets)
        N, K = shape
        f16 = int(kind == "int4" and scales is not None and scales.dtype == torch.float16)
        self.matrix = Matrix(MATRIX_KINDS[kind], N, K, group, _ptr(codes), _ptr(scales), _ptr(offsets), f16, int(fast))
        self.N = N

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.empty(x.shape[0], self.N)
        _lib.matmul_packed(ctypes.addressof(self.matrix), x.data_ptr(), y.data_ptr(), x.shape[0], torch.get_num_threads())  # type: ignore[union-attr]
        return y


def routed_int4_matmul(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None, group: int, fast: bool, experts: Tensor) -> Tensor:
    """x fp32 [M, K] contiguous, row m through expert experts[m] (int64 [M]) of an int4 tiled stack:
    codes [E, N/8, K/32, 128], scales/offsets [E, N/8, K/group, 8] -> fp32 [M, N]. Each row is
    computed as BoundMatmul's kernel computes it alone."""
    assert _lib is not None and experts.dtype == torch.int64 and experts.is_contiguous()
    M, N, K = x.shape[0], codes.shape[1] * 8, codes.shape[2] * 32
    y = torch.empty(M, N)
    f16 = int(scales.dtype == torch.float16)
    _lib.matmul_int4(_ptr(x), _ptr(codes), _ptr(scales), _ptr(offsets), f16, _ptr(experts), _ptr(y), M, N, K, group, int(fast), torch.get_num_threads())
    return y


def prompt_rounding() -> bool:
    """Whether prompt_int4_matmul can round the activations to int8 halves here (AVX-512 VNNI)."""
    return available() and bool(_lib.prompt_matmul_int4_rounded_available())  # type: ignore[union-attr]


def prompt_int4_matmul(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None, group: int, experts: Tensor | None = None,
                       halves: int = 0) -> Tensor:
    """x fp32 [M, K] contiguous @ W.T -> fp32 [M, N] for the many rows of a prompt, W int4 tiles
    (codes [N/8, K/32, 128], scales/offsets [N/8, K/group, 8]). halves 0: as exact as dequantizing W
    for a dense matmul (and faster than that on an expert stack's runs only); 1 or 2, where
    prompt_rounding(): the activations rounded to that many int8 halves as the one-token kernels round
    them (2: their default, 1: --fast-math). With `experts` (int64 [M], sorted), W is a stack [E, ...]
    and row m goes through experts[m]."""
    assert _lib is not None and (experts is None or (experts.dtype == torch.int64 and experts.is_contiguous()))
    assert halves == 0 or prompt_rounding()
    M, N, K = x.shape[0], codes.shape[-3] * 8, codes.shape[-2] * 32
    y = torch.empty(M, N)
    f16 = int(scales.dtype == torch.float16)
    args = (_ptr(x), _ptr(codes), _ptr(scales), _ptr(offsets), f16, _ptr(experts), _ptr(y), M, N, K, group)
    if halves:
        _lib.prompt_matmul_int4_rounded(*args, halves, torch.get_num_threads())  # type: ignore[union-attr]
    else:
        _lib.prompt_matmul_int4(*args, torch.get_num_threads())  # type: ignore[union-attr]
    return y


class Norm(ctypes.Structure):
    """layer.c's Norm: an RMSNorm's weight (fp32, or none) and constants."""

    _fields_ = [("weight", ctypes.c_void_p), ("eps", ctypes.c_float), ("offset", ctypes.c_float)]


class DecodeLayer(ctypes.Structure):
    """layer.c's DecodeLayer: a decoder layer's weights and shapes for a decode step (model/one_token.py
    fills it; the tensors it points at must outlive it)."""

    _fields_ = [*[(name, Matrix) for name in ("q", "k", "v", "o", "gate", "up", "down", "ple_gate", "ple_projection",
                                              "experts_gate_up", "experts_down")],
                *[(name, Norm) for name in ("input", "q_norm", "k_norm", "v_norm", "post_attention", "pre_feedforward",
                                            "post_feedforward", "post_per_layer_input", "post_feedforward_1", "pre_feedforward_2",
                                            "post_feedforward_2")],
                *[(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "width", "ple_dim", "owns_kv", "v_normed",
                                                      "k_eq_v", "top_k", "expert_width")],
                ("layer_scalar", ctypes.c_void_p)]


def decode_layer_attention_inputs(layer: DecodeLayer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """x fp32 [B, hidden] contiguous; cos, sin fp32 [B, D] contiguous -> q [B, heads, D] (normed,
    rotated) and, where the layer owns K/V, k (None on K=V layers) and v [B, kv_heads, D] (else None)."""
    B, D = x.shape[0], layer.head_dim
    q = torch.empty(B, layer.heads, D)
    k = torch.empty(B, layer.kv_heads, D) if layer.owns_kv and not layer.k_eq_v else None
    v = torch.empty(B, layer.kv_heads, D) if layer.owns_kv else None
    _lib.decode_layer_attention_inputs(ctypes.addressof(layer), _ptr(x), _ptr(cos), _ptr(sin), _ptr(q), _ptr(k), _ptr(v), B, torch.get_num_threads())  # type: ignore[union-attr]
    return q, k, v


def decode_layer_rest(layer: DecodeLayer, x: Tensor, attended: Tensor, per_layer_input: Tensor | None) -> Tensor:
    """x fp32 [B, hidden] and attended [B, heads * D], contiguous; per_layer_input fp32 [B, ple_dim]
    (rows at any stride, columns contiguous) or None -> the output [B, hidden] of a layer without experts."""
    out = torch.empty_like(x)
    stride = per_layer_input.stride(0) if per_layer_input is not None else 0
    _lib.decode_layer_rest(ctypes.addressof(layer), _ptr(x), _ptr(attended), _ptr(per_layer_input), stride, _ptr(out), x.shape[0], torch.get_num_threads())  # type: ignore[union-attr]
    return out


class StepAttention(ctypes.Structure):
    """layer.c's StepAttention: where one layer's attention writes and reads the K/V cache in a decode step,
    with this step's rotation, mask and per-layer input (model/one_token.py fills it; the tensors it points
    at must outlive the call)."""

    _fields_ = [("rows", ctypes.c_int64), ("key_slot", ctypes.c_void_p), ("value_slot", ctypes.c_void_p), ("key_slot_strides", ctypes.c_int64 * 2),
                ("value_slot_strides", ctypes.c_int64 * 2), ("key", ctypes.c_void_p), ("value", ctypes.c_void_p),
                ("key_strides", ctypes.c_int64 * 2), ("value_strides", ctypes.c_int64 * 2), ("slots", ctypes.c_int64),
                ("kv_kind", ctypes.c_int64), ("allowed", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
                ("key_weight", ctypes.c_void_p), ("key_cos", ctypes.c_void_p), ("key_sin", ctypes.c_void_p),
                ("key_positions", ctypes.c_void_p), ("rotated_pairs", ctypes.c_int64), ("scale", ctypes.c_float),
                ("per_layer_input", ctypes.c_void_p), ("per_layer_stride", ctypes.c_int64)]


def decode_layers(layers: Sequence[DecodeLayer], steps: ctypes.Array, x: Tensor) -> Tensor:
    """A decode step's layers in one call: x fp32 [B, hidden] contiguous -> the last one's output [B, hidden];
    steps[i * caches + j] (StepAttention) is layer i's attention in cache j (of kind fp32, bf16 or fp16)."""
    out = torch.empty_like(x)
    pointers = (ctypes.c_void_p * len(layers))(*map(ctypes.addressof, layers))
    caches = len(steps) // len(layers)
    _lib.decode_layers(pointers, steps, len(layers), caches, _ptr(x), _ptr(out), x.shape[0], torch.get_num_threads())  # type: ignore[union-attr]
    return out


def decode_layer_attention_output(layer: DecodeLayer, x: Tensor, attended: Tensor) -> Tensor:
    """decode_layer_rest's first half: x + the normed output projection of attended -> [B, hidden]."""
    out = torch.empty_like(x)
    _lib.decode_layer_attention_output(ctypes.addressof(layer), _ptr(x), _ptr(attended), _ptr(out), x.shape[0], torch.get_num_threads())  # type: ignore[union-attr]
    return out


def decode_layer_feedforward(layer: DecodeLayer, x: Tensor, routing: tuple[Tensor, Tensor] | None, per_layer_input: Tensor | None) -> Tensor:
    """decode_layer_rest's second half, from the first's output x: routing = the router's (weights fp32,
    expert ids int64), contiguous [B, top_k], on MoE layers -> [B, hidden]."""
    out = torch.empty_like(x)
    weights, ids = routing if routing is not None else (None, None)
    stride = per_layer_input.stride(0) if per_layer_input is not None else 0
    _lib.decode_layer_feedforward(ctypes.addressof(layer), _ptr(x), _ptr(weights), _ptr(ids), _ptr(per_layer_input), stride, _ptr(out),  # type: ignore[union-attr]
                                  x.shape[0], torch.get_num_threads())
    return out


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU (tanh form) of x fp32 contiguous."""
    out = torch.empty_like(x)
    _lib.gelu_tanh(_ptr(x), None, _ptr(out), x.numel(), torch.get_num_threads())  # type: ignore[union-attr]
    return out


def softcap_(x: Tensor, cap: float) -> Tensor:
    """x = cap * tanh(x / cap) in place, x fp32 contiguous (a few ulp from PyTorch's three operators)."""
    _lib.softcap(_ptr(x), x.numel(), cap, torch.get_num_threads())  # type: ignore[union-attr]
    return x


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, offset: float) -> Tensor:
    """x: fp32 [..., D] contiguous; weight: fp32 [D] or None."""
    out = torch.empty_like(x)
    D = x.shape[-1]
    _lib.rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // D, D, eps, offset)  # type: ignore[union-attr]
    return out


def rms_norm_rotary(x: Tensor, weight: Tensor | None, eps: float, offset: float, cos: Tensor, sin: Tensor) -> Tensor:
    """RMSNorm then rotary embedding: x fp32 [B, T, H, D] contiguous; cos, sin fp32 [B, T, D] contiguous."""
    out = torch.empty_like(x)
    B, T, H, D = x.shape
    _lib.rms_norm_rotary(_ptr(x), _ptr(weight), _ptr(cos), _ptr(sin), _ptr(out), B * T, H, D, eps, offset)  # type: ignore[union-attr]
    return out


def route(x: Tensor, scale: Tensor, root: float, proj: Tensor, per_expert_scale: Tensor, top_k: int, eps: float) -> tuple[Tensor, Tensor]:
    """The MoE router (model/layers.py's Router) of x fp32 [N, H] contiguous; scale fp32 [H], proj fp32
    [E, H], per_expert_scale fp32 [E], contiguous -> (weights fp32, expert ids int64) [N, top_k]."""
    N, H = x.shape
    weights, ids = torch.empty(N, top_k), torch.empty(N, top_k, dtype=torch.int64)
    _lib.route(_ptr(x), _ptr(scale), root, _ptr(proj), _ptr(per_expert_scale), N, H, proj.shape[0], top_k, eps, _ptr(weights), _ptr(ids),  # type: ignore[union-attr]
               torch.get_num_threads())
    return weights, ids


KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}  # decode.c's enum


def attend_one_query(q: Tensor, key: Tensor | Int8Tensor, value: Tensor | Int8Tensor, allowed: Tensor, scale: float,
                     key_of_value: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """q: fp32 [B, H, D] contiguous; key, value: fp32, bf16, fp16 or Int8Tensor (both the same)
    [B, KV, S, D] (a cache buffer's slice is read in place; other layouts are copied first);
    allowed: bool [B, S] contiguous -> fp32 [B, H, D]. key_of_value (K=V layers, where `key` is
    ignored): k_norm's weight fp32 [D], the cos and sin of each position's rotated pairs fp32
    [positions, pairs] (model/rope.py's KeyRotations) and the slots' positions int64 [B, S], each
    allowed slot's key being its value times the weight, rotated at its position."""
    B, H, D = q.shape
    if key_of_value is not None:
        key = value
    KV, S = key.shape[1], key.shape[2]
    if isinstance(value, Int8Tensor):
        key_scales, value_scales = key.scales, value.scales  # type: ignore[union-attr]
        key, value = key.codes, value.codes  # type: ignore[union-attr]
        blocks = key_scales.shape[-1]
        key_scales, value_scales = (t if t.stride()[2:] == (blocks, 1) else t.contiguous() for t in (key_scales, value_scales))
        scale_strides = (*key_scales.stride()[:2], *value_scales.stride()[:2])
    else:  # (a decode step's common case, ~40 such calls: no more Python here than it needs)
        key_scales = value_scales = None
        blocks, scale_strides = 1, (0, 0, 0, 0)
    key_strides, value_strides = key.stride(), value.stride()
    if key_strides[2:] != (D, 1):
        key = key.contiguous()
        key_strides = key.stride()
    if value_strides[2:] != (D, 1):
        value = value.contiguous()
        value_strides = value.stride()
    weight, cos, sin, positions = (t.contiguous() for t in key_of_value) if key_of_value is not None else (None,) * 4
    out = torch.empty_like(q)
    _lib.attend_one_query(  # type: ignore[union-attr]
        q.data_ptr(), key.data_ptr(), value.data_ptr(), KV_KINDS[key.dtype], _ptr(key_scales), _ptr(value_scales), allowed.data_ptr(),
        out.data_ptr(), B, H, KV, S, D, _Strides2(*key_strides[:2]), _Strides2(*value_strides[:2]), _Strides4(*scale_strides), D // blocks,
        _ptr(weight), _ptr(cos), _ptr(sin), _ptr(positions), 0 if cos is None else cos.shape[1], scale, torch.get_num_threads(),
    )
    return out


_Strides2, _Strides4 = ctypes.c_int64 * 2, ctypes.c_int64 * 4


def dequantize_int4(codes: Tensor, scales: Tensor, offsets: Tensor | None, group: int, rows: slice) -> Tensor:
    """Rows of an int4 tiled weight as fp32 [rows, K]."""
    n0, n1, _ = rows.indices(codes.shape[0] * 8)
    K = codes.shape[1] * 32
    out = torch.empty(n1 - n0, K, dtype=torch.float32)
    f16 = int(scales.dtype == torch.float16)
    _lib.dequantize_int4(_ptr(codes), _ptr(scales), _ptr(offsets), f16, _ptr(out), n0, n1, K, group, torch.get_num_threads())  # type: ignore[union-attr]
    return out


def tile_q4_0(blocks: np.ndarray, N: int, K: int) -> tuple[Tensor, Tensor]:
    """GGUF Q4_0 blocks (uint8, contiguous, [N, K/32 * 18] bytes) of an [N, K] weight, N a multiple of
    8 -> int4 tiles [N/8, K/32, 128] and their fp16 scales [N/8, K/32, 8] (no offsets: the Q4_0 grid)."""
    codes = torch.empty(N // 8, K // 32, 128, dtype=torch.uint8)
    scales = torch.empty(N // 8, K // 32, 8, dtype=torch.float16)
    assert blocks.flags.c_contiguous and blocks.nbytes == N * K // 32 * 18
    _lib.tile_q4_0(blocks.ctypes.data, _ptr(codes), _ptr(scales), N, K, torch.get_num_threads())  # type: ignore[union-attr]
    return codes, scales


def unpack_q6_k(blocks: np.ndarray) -> tuple[Tensor, Tensor]:
    """GGUF Q6_K blocks (uint8, contiguous, 210 bytes each) -> int8 codes [blocks, 256] and fp32
    scales [blocks, 16] (w = scale * code per 16 columns)."""
    count = blocks.nbytes // 210
    assert blocks.flags.c_contiguous and blocks.nbytes == count * 210
    codes, scales = torch.empty(count, 256, dtype=torch.int8), torch.empty(count, 16)
    _lib.unpack_q6_k(blocks.ctypes.data, _ptr(codes), _ptr(scales), count, torch.get_num_threads())  # type: ignore[union-attr]
    return codes, scales


def fit_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """w fp32 [..., G, size] contiguous -> the fitted int4 scales and offsets, fp32 [..., G]."""
    scales, offsets = torch.empty(w.shape[:-1]), torch.empty(w.shape[:-1])
    _lib.fit_int4(_ptr(w), scales.numel(), w.shape[-1], _ptr(scales), _ptr(offsets), torch.get_num_threads())  # type: ignore[union-attr]
    return scales, offsets


def code_int4(w: Tensor, scales: Tensor, offsets: Tensor) -> Tensor:
    """w fp32 [..., G, size] contiguous under scales and offsets fp32 [..., G] -> int4 codes in the
    row layout, uint8 [..., G * size / 2]."""
    codes = torch.empty(*w.shape[:-2], w.shape[-2] * w.shape[-1] // 2, dtype=torch.uint8)
    scales, offsets = scales.float().contiguous(), offsets.float().contiguous()
    _lib.code_int4(_ptr(w), scales.numel(), w.shape[-1], _ptr(scales), _ptr(offsets), _ptr(codes), torch.get_num_threads())  # type: ignore[union-attr]
    return codes


def fit_q4_0(w: Tensor) -> tuple[Tensor, Tensor]:
    """w fp32 [..., G, 32] contiguous -> Q4_0 scales fp32 [..., G] and codes in the row layout, uint8 [..., G * 16]."""
    scales = torch.empty(w.shape[:-1])
    codes = torch.empty(*w.shape[:-2], w.shape[-2] * 16, dtype=torch.uint8)
    _lib.fit_q4_0(_ptr(w), scales.numel(), _ptr(scales), _ptr(codes), torch.get_num_threads())  # type: ignore[union-attr]
    return scales, codes


def read_bandwidth(threads: int, data: Tensor, repeats: int = 5) -> float:
    """Bytes per second `threads` threads read from RAM, best of `repeats` passes over `data` (resident,
    far larger than the caches), read as the weight kernels read."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _lib.read_memory(_ptr(data), data.nbytes // 128 * 128, threads)  # type: ignore[union-attr]
        best = min(best, time.perf_counter() - start)
    return data.nbytes // 128 * 128 / best


if _lib is not None:
    for _name in ("matmul_packed", "matmul_int4", "prompt_matmul_int4", "prompt_matmul_int4_rounded", "dequantize_int4", "tile_q4_0", "unpack_q6_k", "fit_int4", "code_int4", "fit_q4_0", "rms_norm",
                  "rms_norm_rotary", "attend_one_query", "gelu_tanh", "softcap", "decode_layer_attention_inputs", "decode_layer_rest",
                  "decode_layer_attention_output", "decode_layer_feedforward", "decode_layers", "route"):
        getattr(_lib, _name).restype = None
    _i64, _int, _p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    _lib.matmul_packed.argtypes = [_p, _p, _p, _i64, _int]
    _lib.matmul_int4.argtypes = [_p, _p, _p, _p, _int, _p, _p, _i64, _i64, _i64, _i64, _int, _int]
    _lib.prompt_matmul_int4.argtypes = [_p, _p, _p, _p, _int, _p, _p, _i64, _i64, _i64, _i64, _int]
    _lib.prompt_matmul_int4_rounded.argtypes = [_p, _p, _p, _p, _int, _p, _p, _i64, _i64, _i64, _i64, _int, _int]
    _lib.prompt_matmul_int4_rounded_available.restype = ctypes.c_int
    _lib.gelu_tanh.argtypes = [_p, _p, _p, _i64, _int]
    _lib.softcap.argtypes = [_p, _i64, ctypes.c_float, _int]
    _lib.decode_layer_attention_inputs.argtypes = [_p, _p, _p, _p, _p, _p, _p, _i64, _int]
    _lib.decode_layer_rest.argtypes = [_p, _p, _p, _p, _i64, _p, _i64, _int]
    _lib.decode_layer_attention_output.argtypes = [_p, _p, _p, _p, _i64, _int]
    _lib.decode_layers.argtypes = [_p, _p, _i64, _i64, _p, _p, _i64, _int]
    _lib.decode_layer_feedforward.argtypes = [_p, _p, _p, _p, _p, _i64, _p, _i64, _int]
    _lib.dequantize_int4.argtypes = [_p, _p, _p, _int, _p, _i64, _i64, _i64, _i64, _int]
    _lib.tile_q4_0.argtypes = [_p, _p, _p, _i64, _i64, _int]
    _lib.unpack_q6_k.argtypes = [_p, _p, _p, _i64, _int]
    _lib.fit_int4.argtypes = [_p, _i64, _i64, _p, _p, _int]
    _lib.code_int4.argtypes = [_p, _i64, _i64, _p, _p, _p, _int]
    _lib.fit_q4_0.argtypes = [_p, _i64, _p, _p, _int]
    _lib.read_memory.restype = ctypes.c_int64
    _lib.read_memory.argtypes = [_p, _i64, _int]
    _lib.route.argtypes = [_p, _p, ctypes.c_float, _p, _p, _i64, _i64, _i64, _i64, ctypes.c_float, _p, _p, _int]
    _lib.rms_norm.argtypes = [_p, _p, _p, _i64, _i64, ctypes.c_float, ctypes.c_float]
    _lib.rms_norm_rotary.argtypes = [_p, _p, _p, _p, _p, _i64, _i64, _i64, ctypes.c_float, ctypes.c_float]
    _lib.attend_one_query.argtypes = [_p, _p, _p, _int, _p, _p, _p, _p, *[_i64] * 5, _p, _p, _p, _i64, _p, _p, _p, _p, _i64, ctypes.c_float, _int]
