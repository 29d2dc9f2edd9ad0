"""Generation: greedy tokens equal `transformers` generate(); sampling options do what they say."""

from __future__ import annotations

import pytest
import torch

import gemma4
from gemma4.model import one_token
from gemma4.runtime.generate import PromptTooLong, Session, decode_step, generate_ids, teacher_forced_logits
from gemma4.runtime.sampling import SamplingParams, filter_logits, penalize_repetition, sample
from gemma4.weights.synth import synthesize

from conftest import TINY_PRESETS, reference_class

transformers = pytest.importorskip("transformers")


def prompts_of(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 262_144, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_batch_equals_reference_generate(checkpoints, preset):
    """Two prompts of different lengths (left-padded), prefilled in window-sized chunks."""
    path = checkpoints(preset)
    lm = gemma4.load(path, dtype=torch.float32, progress=False).lm
    prompts = prompts_of(13, 21)
    ours = torch.stack(list(generate_ids(lm, prompts, max_new_tokens=24, prefill_chunk=lm.config.sliding_window)), 1)

    reference = reference_class(path).from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    theirs = reference.eval().generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[:, width:]
    assert torch.equal(ours, theirs)


# Experts in int4 tiles need widths in whole 32-blocks: the tiny preset's are 24.
WHOLE_BLOCK_EXPERTS = {"moe_intermediate_size": 32}


@pytest.mark.parametrize("preset,overrides,options", [
    ("tiny-e2b", None, {"quant": "q4_0"}), ("tiny-e2b", None, {"quant": "int4", "kv_dtype": "int8"}), ("tiny-31b", None, {"quant": "int8"}),
    ("tiny-26b-a4b", WHOLE_BLOCK_EXPERTS, {"quant": "q4_0"}), ("tiny-gemma3", None, {"quant": "bf16"}),
])
def test_decode_steps_without_the_modules_are_the_modules_bit_for_bit(checkpoints, tmp_path, monkeypatch, preset, overrides, options):
    """A decode step's layers run as compiled calls (model/one_token.py: all in one with one cache, else two
    a layer, three with experts), K=V and MoE layers too: the same logits, bit for bit, for one sequence
    and for sessions decoded together (a cache per row)."""
    path = synthesize(preset, tmp_path, dtype=torch.float32, seed=7, progress=False, overrides=overrides) if overrides else checkpoints(preset)
    lm = gemma4.load(path, progress=False, **options).lm
    ids = prompts_of(2 * lm.config.sliding_window + 3)[0]
    bind, taken = one_token.bind, []
    monkeypatch.setattr(one_token, "bind", lambda layer, rows: taken.append(bind(layer, rows)) or taken[-1])

    def decoded() -> tuple[torch.Tensor, torch.Tensor]:
        sessions = [Session(lm, 64) for _ in range(3)]
        for n, session in enumerate(sessions):
            session.start_prompt(ids[: 5 + n])
        together = torch.stack([decode_step(lm, sessions, ids[i : i + 3]) for i in range(4)])
        return teacher_forced_logits(lm, ids), together

    direct = decoded()
    assert taken and all(b is not None for b in taken)
    monkeypatch.setattr(one_token, "bind", lambda layer, rows: None)
    modules = decoded()
    assert all(torch.equal(a, b) for a, b in zip(direct, modules))


@pytest.mark.parametrize("preset,options", [
    ("tiny-e2b", {"quant": "int4"}), ("tiny-e2b", {"quant": "q4_0", "kv_dtype": "bf16"}), ("tiny-31b", {"quant": "int8", "kv_dtype": "float32"}),
])
def test_a_decode_step_in_one_call_is_the_step_layer_by_layer_bit_for_bit(checkpoints, monkeypatch, preset, options):
    """A decode step's layers run in one compiled call that writes their new keys and values into the
    caches itself (model/one_token.py's run_layers), for a session, a batch's rows in one cache, and sessions
    decoded together (a cache each): the same logits and the same caches, bit for bit, as layer by layer,
    for fp16 (the default), bf16 and fp32 K/V, K=V layers too. A key norm's weight spread over 1e-9 .. 1e6
    puts keys past fp16's range (saturated) and below its normals (rounded as PyTorch writes them)."""
    lm = gemma4.load(checkpoints(preset), progress=False, **options).lm
    k_norm = lm.model.layers[0].self_attn.k_norm.weight
    k_norm.data.copy_(torch.logspace(-9, 6, k_norm.numel() // 2).repeat(2))  # (rotation mixes d and d + D/2)
    ids = prompts_of(2 * lm.config.sliding_window + 5)[0]
    run_layers, taken = one_token.run_layers, []
    monkeypatch.setattr(one_token, "run_layers", lambda *args: taken.append(run_layers(*args)) or taken[-1])

    def decoded() -> list[torch.Tensor]:
        sessions = [Session(lm, 64) for _ in range(3)]
        for n, session in enumerate(sessions):
            session.start_prompt(ids[: 5 + n])
        alone = torch.stack([decode_step(lm, sessions[:1], [token]) for token in ids[5:12]])
        together = torch.stack([decode_step(lm, sessions, ids[i : i + 3]) for i in range(4)])
        caches = [t for s in sessions for kv in s.cache.layers.values() for t in (kv.key, kv.value) if t is not None]
        batch = torch.stack(list(generate_ids(lm, prompts_of(9, 14), max_new_tokens=6)), 1)
        return [teacher_forced_logits(lm, ids), alone, together, batch, *caches]

    compiled = decoded()
    assert taken and all(out is not None for out in taken)
    monkeypatch.setattr(one_token, "run_layers", lambda *args: None)
    layer_by_layer = decoded()
    assert len(compiled) == len(layer_by_layer) and all(torch.equal(a, b) for a, b in zip(compiled, layer_by_layer))
    if lm.kv_dtype == torch.float16:  # the keys did reach both ends of its range
        stored = torch.cat([t.flatten() for t in compiled[4:]]).float().abs()
        assert (stored == 65504).any() and ((stored > 0) & (stored < 2**-14)).any()


def test_stop_ids_and_banned_ids(checkpoints):
    lm = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm
    prompt = prompts_of(9)
    free = torch.cat(list(generate_ids(lm, prompt, max_new_tokens=12)))
    # Stopping on the 4th greedy token: it is yielded, then the row ends.
    stopped = torch.cat(list(generate_ids(lm, prompt, max_new_tokens=12, stop_ids={int(free[3])})))
    assert torch.equal(stopped, free[: list(free).index(free[3]) + 1])
    # Banning the first greedy token changes the first step.
    banned = next(generate_ids(lm, prompt, max_new_tokens=1, banned_ids={int(free[0])}))
    assert banned.item() != free[0].item()


def test_prompt_longer_than_context_fails_before_any_work(checkpoints):
    lm = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False).lm
    with pytest.raises(PromptTooLong, match="the prompt is 40 tokens but the context is 32"):
        next(generate_ids(lm, prompts_of(40), max_new_tokens=4, context=32))


def test_sampling_is_reproducible_with_a_seed():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=11)
    empty = torch.zeros(3, 0, dtype=torch.long)
    a = [sample(logits, params, empty, g := params.generator()) for _ in range(1)] + [sample(logits, params, empty, g)]
    b = [sample(logits, params, empty, g := params.generator()) for _ in range(1)] + [sample(logits, params, empty, g)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_filters_keep_what_they_should():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False, False]
    # probabilities .64 .24 .09 .03 .01: top_p 0.8 keeps the token that crosses 0.8
    assert kept(top_p=0.8) == [True, True, False, False, False]
    assert kept(min_p=0.1) == [True, True, True, False, False]
    assert sample(logits, SamplingParams(temperature=0.7, top_k=1), torch.zeros(1, 0, dtype=torch.long), None).item() == 0


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalized = penalize_repetition(logits, torch.tensor([[0, 1]]), 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]


def test_bad_sampling_options_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
