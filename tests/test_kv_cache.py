"""Cached decoding equals one full forward pass, and every cache rule shows in measured bytes."""

from __future__ import annotations

import pytest
import torch

import gemma4
from gemma4.runtime.generate import prefill
from gemma4.runtime.kv_cache import ModelCache, global_capacity

from conftest import TINY_PRESETS


def ids_for(length: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 262_144, (batch, length), generator=torch.Generator().manual_seed(3))


def arange_positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1]).expand(ids.shape[0], -1)


def decode_all(lm, ids: torch.Tensor, prompt: int, chunk: int | None = None) -> torch.Tensor:
    """Prefill `prompt` tokens, then decode the rest one by one -> logits for positions prompt-1..end."""
    positions = arange_positions(ids)
    cache = ModelCache(lm.plan, ids.shape[0], 4096, torch.float32)
    out = [prefill(lm, cache, ids[:, :prompt], positions[:, :prompt], chunk or prompt)[:, None]]
    for t in range(prompt, ids.shape[1]):
        out.append(lm.step(ids[:, t : t + 1], positions[:, t : t + 1], cache, keep=1))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_incremental_decoding_equals_full_forward(checkpoints, preset):
    path = checkpoints(preset)
    lm = gemma4.load(path, dtype=torch.float32, progress=False).lm
    lm64 = gemma4.load(path, dtype=torch.float32, progress=False).lm.to(torch.float64)
    W = lm.config.sliding_window
    ids = ids_for(4 * W + 3)
    truth = lm64(ids)
    full_error = (lm(ids).double() - truth).abs().max().item()
    for prompt in (1, W - 1, W, W + 1, 3 * W + 1):
        cached = decode_all(lm, ids, prompt).double()
        error = (cached - truth[:, prompt - 1 :]).abs().max().item()
        assert error <= 3 * full_error, f"prompt {prompt}: cached {error:.2e} vs one-shot {full_error:.2e}"


@pytest.mark.parametrize("chunk", [1, 3, 8, 17])
def test_chunked_prefill_equals_one_shot(checkpoints, chunk):
    """Both within fp32 round-off of the same model in fp64 (an absolute bound sat at the edge of
    this round-off on some CPUs: 1.0e-4 against 1e-4)."""
    lm = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm
    truth = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm.to(torch.float64)(ids_for(37))[:, -1]
    ids = ids_for(37)
    one_shot_error = (lm(ids)[:, -1].double() - truth).abs().max().item()
    cache = ModelCache(lm.plan, 2, 4096, torch.float32)
    chunked = prefill(lm, cache, ids, arange_positions(ids), chunk)
    error = (chunked.double() - truth).abs().max().item()
    assert error <= 3 * one_shot_error, f"chunks of {chunk}: {error:.2e} vs one-shot {one_shot_error:.2e}"
    assert cache.length == 37


def cache_after(lm, tokens: int, batch: int = 1) -> ModelCache:
    ids = ids_for(tokens, batch)
    cache = ModelCache(lm.plan, batch, 8192, torch.float32)
    prefill(lm, cache, ids, arange_positions(ids), 64)
    return cache


def test_cache_bytes_follow_the_architecture(checkpoints):
    lm = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm
    plan = lm.plan
    W = lm.config.sliding_window
    per_slot = {p.index: p.num_kv_heads * p.head_dim * 4 * (1 if p.k_eq_v else 2) for p in plan}
    for tokens in (3, W, 5 * W, 300):
        cache = cache_after(lm, tokens)
        by_layer = cache.nbytes_by_layer()
        # KV-shared layers store nothing; every owner stores.
        assert set(by_layer) == {p.index for p in plan if p.owns_kv}
        for p in plan:
            if p.owns_kv:
                slots = W if p.is_sliding else global_capacity(tokens, 8192)
                assert by_layer[p.index] == slots * per_slot[p.index], (tokens, p.index)
    # Sliding memory never grows with the context; global memory does.
    short, long = cache_after(lm, W).nbytes_by_type(), cache_after(lm, 300).nbytes_by_type()
    assert short["sliding_attention"] == long["sliding_attention"]
    assert long["full_attention"] > short["full_attention"]


def test_k_eq_v_layers_store_one_tensor(checkpoints):
    lm = gemma4.load(checkpoints("tiny-31b"), dtype=torch.float32, progress=False).lm
    cache = cache_after(lm, 40)
    for p in lm.plan:
        stored = cache.layers[p.index]
        assert (stored.key is None) == p.k_eq_v
    global_layer = next(p for p in lm.plan if p.k_eq_v)
    assert cache.nbytes_by_layer()[global_layer.index] == global_capacity(40, 8192) * global_layer.num_kv_heads * global_layer.head_dim * 4


def test_global_buffers_grow_by_doubling_up_to_the_context():
    assert [global_capacity(n, 100_000) for n in (0, 1, 256, 257, 1000, 5000)] == [0, 256, 256, 512, 1024, 8192]
    assert global_capacity(99_999, 100_000) == 100_096  # capped at the context, in whole chunks


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_rows_with_caches_of_their_own_decode_as_each_alone(checkpoints, preset):
    """A server batches sequences of different lengths, each with a cache of its own: one step
    over all of them gives each what its own step gives, and a full forward pass, to fp32
    round-off (batched matmuls sum in another order)."""
    from gemma4.runtime.generate import Session, decode_step

    lm = gemma4.load(checkpoints(preset), dtype=torch.float32, progress=False).lm
    prompts = [ids_for(n, batch=1)[0].tolist() for n in (5, 13, 3 * lm.config.sliding_window + 1)]

    def step(group: list[list[int]]) -> torch.Tensor:
        sessions = [Session(lm, 4096, prefill_chunk=7) for _ in group]
        for session, prompt in zip(sessions, group):
            session.start_prompt(prompt)
        return decode_step(lm, sessions, [17] * len(group))

    lm64 = gemma4.load(checkpoints(preset), dtype=torch.float32, progress=False).lm.to(torch.float64)
    truth = torch.stack([lm64(torch.tensor([p + [17]]))[0, -1] for p in prompts])
    full_error = max((lm(torch.tensor([p + [17]]))[0, -1].double() - t).abs().max().item() for p, t in zip(prompts, truth))
    for logits in (step(prompts), torch.cat([step([p]) for p in prompts])):
        assert (logits.double() - truth).abs().max().item() <= 3 * full_error


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_packed_rows_decode_bit_for_bit_as_alone(checkpoints, quant):
    """The int4 and int8 kernels compute each row of a batch as they compute the row alone (exact
    integer sums over the same rounded activations), so a server's greedy answers do not depend on
    what else it is decoding."""
    from gemma4.runtime.generate import Session, decode_step

    lm = gemma4.load(checkpoints("tiny-e2b"), quant=quant, progress=False).lm

    def step(group: list[list[int]]) -> torch.Tensor:
        sessions = [Session(lm, 4096) for _ in group]
        for session, prompt in zip(sessions, group):
            session.start_prompt(prompt)
        return decode_step(lm, sessions, [17] * len(group))

    prompts = [ids_for(n, batch=1)[0].tolist() for n in (13, 21, 5, 30)]
    assert torch.equal(step(prompts), torch.cat([step([p]) for p in prompts]))


def test_session_rolls_back_to_marks_and_truncates_unwrapped_caches(checkpoints):
    """A prompt that departs after a mark re-feeds only from the mark, and the logits equal a
    fresh session's; a cache whose rings never wrapped is cut back without any snapshot."""
    from gemma4.runtime.generate import Session

    lm = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm
    W = lm.config.sliding_window
    shared = ids_for(5 * W, batch=1)[0].tolist()
    first, second = shared + [11, 12, 13], shared + [21, 22]
    session = Session(lm, 4096, prefill_chunk=6)
    session.start_prompt(first, marks=[len(shared)])
    logits, _ = session.start_prompt(second, marks=[len(shared)])
    assert session.reused == len(shared)
    fresh, _ = Session(lm, 4096, prefill_chunk=6).start_prompt(second)
    assert (logits - fresh).abs().max() < 1e-4
    short = Session(lm, 4096)
    short.start_prompt(shared[: W - 2])
    logits, _ = short.start_prompt(shared[: W - 4] + [5, 6])
    assert short.reused == W - 4 and not short.snapshots
    assert (logits - Session(lm, 4096).start_prompt(shared[: W - 4] + [5, 6])[0]).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-31b", "tiny-26b-a4b"])
def test_int8_cache_is_the_model_with_its_k_v_rounded(checkpoints, preset, monkeypatch):
    """An int8 cache (codes read in place, scales on the scores and weights) decodes what an fp32
    cache of the same rounded K/V decodes, over several windows, ring wraps, K=V and shared layers:
    to round-off almost everywhere; where round-off moves a K/V value across a rounding edge, by
    one int8 step of it."""
    from gemma4.model.int8_kv import Int8Tensor

    lm = gemma4.load(checkpoints(preset), dtype=torch.float32, progress=False).lm
    ids = ids_for(3 * lm.config.sliding_window + 5)

    def run(dtype: torch.dtype) -> torch.Tensor:
        positions = arange_positions(ids)
        cache = ModelCache(lm.plan, ids.shape[0], 4096, dtype)
        out = [prefill(lm, cache, ids[:, :9], positions[:, :9], 4)[:, None]]
        out += [lm.step(ids[:, t : t + 1], positions[:, t : t + 1], cache, keep=1) for t in range(9, ids.shape[1])]
        return torch.cat(out, dim=1)

    int8 = run(torch.int8)
    with monkeypatch.context() as patch:
        patch.setattr(ModelCache, "_narrow", lambda self, x: Int8Tensor.quantize(x).dequantize())
        rounded = run(torch.float32)
    difference, scale = (int8 - rounded).abs(), rounded.abs().max()
    assert difference.median() <= 1e-5 * scale and difference.max() <= 1e-2 * scale
