"""One engine, measured in its own process (so peak memory is its own, and llama.cpp's OpenMP
never meets PyTorch's): load, cold start to the first token of a short prompt, prefill of a long
prompt, greedy decode. Prints one JSON object.

    python -m gemma4.benchmark.workers ENGINE '{"model": ..., "prompt": [...], ...}'
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: cold start counts them

import contextlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(job: dict[str, Any], load_s: float, start: Callable[[list[int]], Any], step: Callable[[Any], Any]) -> dict[str, Any]:
    """The same clock for every engine. start(prompt): prefill a fresh sequence, return its first
    token; step(token): feed one token, return the next. Cold start ends at the first token of the
    short prompt; then the long prompt is prefilled and decoded."""

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        started = time.perf_counter()
        token = start(prompt)
        prefilled = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = step(token)
        return prefilled - started, time.perf_counter() - prefilled

    first_token = run(job["short_prompt"], 1)[0]
    cold = time.perf_counter() - STARTED
    prefill, decode = run(job["prompt"], job["new_tokens"])
    return {"load_s": load_s, "cold_start_s": cold, "ttft_short_s": first_token, "prefill_s": prefill, "decode_s": decode}


def gemma4_engine(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import gemma4
    from gemma4.runtime.generate import Batch

    tp = job.get("tp", 1)
    torch.set_num_threads(max(1, job["threads"] // tp))
    if tp > 1:  # every rank runs the same steps (under torchrun); rank 0 reports for all
        from gemma4.parallel.ranks import Ranks

        Ranks.start(tp)
    started = time.perf_counter()
    model = gemma4.load(job["model"], dtype=job.get("dtype"), quant=job.get("quant"), context=job["context"], progress=False,
                        fast_math=job.get("fast_math", False), tp=tp)
    load = time.perf_counter() - started
    batch: list[Batch] = []  # the sequence being run
    running = torch.zeros(1, dtype=torch.bool)
    routed = RoutedExperts(model.lm)

    def start(prompt: list[int]) -> torch.Tensor:
        batch[:] = [Batch(model.lm, [prompt], job["context"], model.prefill_chunk, 0)]
        return batch[0].start()[0].argmax(-1)

    def step(token: torch.Tensor) -> torch.Tensor:
        with routed.counting():
            return batch[0].feed(token, running).argmax(-1)

    timings = measure(job, load, start, step)
    dense = decode_bytes(module_bytes(model.lm), experts=0.0)
    result = {**timings, "weight_bytes_per_token": dense + routed.bytes_per_step(), **encode_times(model)}
    if routed.layers:  # what the routing read, beside what a token's top_k of the experts would
        result["routed_expert_bytes_per_token"] = routed.bytes_per_step()
        result["top_k_expert_bytes_per_token"] = decode_bytes(module_bytes(model.lm), job["routed_fraction"]) - dense
    return result if tp == 1 else over_ranks(model, result)


def over_ranks(model, result: dict[str, Any]) -> dict[str, Any] | None:  # noqa: ANN001 - a gemma4.Model
    """Rank 0's figures with the weight bytes all ranks read per token (each its split part and its
    rows of the LM head, the tied embeddings) and the largest peak; None on the other ranks."""
    import torch.distributed as dist

    from gemma4.parallel.ranks import leave

    head = model.lm.model.embed_tokens if model.lm.lm_head is None else model.lm.lm_head
    head_bytes = decode_bytes(module_bytes(head))
    read = result["weight_bytes_per_token"] - head_bytes + head_bytes // model.ranks.size
    everyone: list[Any] = [None] * model.ranks.size
    dist.all_gather_object(everyone, (read, peak_rss_bytes()))
    leave()
    if model.ranks.rank:
        return None
    return {**result, "weight_bytes_per_token": sum(r for r, _ in everyone), "peak_rss_bytes": max(p for _, p in everyone), "ranks": model.ranks.size}


def encode_times(model) -> dict[str, float]:  # noqa: ANN001 - a gemma4.Model
    """Milliseconds per soft token of encoding a 280-token image and a 10 s clip, where the model
    reads them (the encoders load first, outside the clock). A checkpoint whose encoders are missing
    (one saved before `gemma4 quantize` kept them) still gets its text figures."""
    from gemma4.errors import Gemma4Error

    try:
        return _encode_times(model)
    except Gemma4Error as error:
        print(f"gemma4 bench: encoders not timed: {error}", file=sys.stderr)
        return {}


def _encode_times(model) -> dict[str, float]:  # noqa: ANN001 - a gemma4.Model
    import numpy as np
    import torch
    from PIL import Image

    from gemma4.media.audio import clips
    from gemma4.media.image import image_patches

    times = {}
    rng = np.random.default_rng(0)
    if "image" in model.encoder_kinds:
        picture = image_patches(Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)), 280)
        encoders = model._require_encoders("image")
        started = time.perf_counter()
        with torch.inference_mode():
            encoders.images(picture.pixels[None], picture.positions[None])
        times["image_encode_ms_per_token"] = (time.perf_counter() - started) * 1e3 / picture.tokens
    if "audio" in model.encoder_kinds:
        (clip,) = clips((0.1 * rng.standard_normal(160_000)).astype(np.float32))
        encoders = model._require_encoders("audio")
        started = time.perf_counter()
        with torch.inference_mode():
            encoders.audio(clip.features[None], clip.mask[None])
        times["audio_encode_ms_per_token"] = (time.perf_counter() - started) * 1e3 / clip.tokens
    return times


PLE_TABLES = ("embed_tokens_per_layer", "per_layer_token_embd")  # HF and GGUF names: a token reads one row
EXPERTS = ("experts.", "_exps.weight")  # HF and GGUF names of the routed experts' stacks


def decode_bytes(named_sizes: Iterable[tuple[str, int]], experts: float = 1.0) -> int:
    """Weight bytes one decode step reads: every weight once (the token embedding as the tied LM
    head), except the PLE table; of the experts' stacks, the fraction `experts` (top_k / num_experts
    for a token routed to top_k of them)."""
    total = 0.0
    for name, size in named_sizes:
        if not any(table in name for table in PLE_TABLES):
            total += size * (experts if any(stack in name for stack in EXPERTS) else 1.0)
    return int(total)


class RoutedExperts:
    """The expert weight bytes decode steps read, as routed: while `counting()`, each MoE layer's
    router is watched, and a step reads the distinct experts it picks (those this rank holds), whole.
    Watched by wrapping the routers' forward, not by hooks: a layer with forward hooks runs as modules
    (model/one_token.py), and the bench would time that slower path instead of the one users get. The
    picks are only kept during the timed steps, and counted afterwards."""

    def __init__(self, lm) -> None:  # noqa: ANN001 - a CausalLM
        self.layers = [layer for layer in lm.model.layers if hasattr(layer, "experts")]
        self.picks: list[tuple[Any, range, int]] = []  # (expert ids tensor, the experts held, bytes an expert)
        self.steps = 0
        self._on = False
        for layer in self.layers:
            layer.router.forward = self._watch(layer.router.forward, layer.experts)

    def _watch(self, route, experts):  # noqa: ANN001, ANN202 - Router.forward, Experts or PackedExperts
        count = experts.gate_up_proj.shape[0]
        held, per_expert = range(experts.first, experts.first + count), sum(size for _, size in module_bytes(experts)) // count

        def routed(x):  # noqa: ANN001, ANN202
            weights, ids = route(x)
            if self._on:
                self.picks.append((ids, held, per_expert))
            return weights, ids

        return routed

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self._on = True
        try:
            yield
        finally:
            self._on = False
            self.steps += 1

    def bytes_per_step(self) -> int:
        read = 0
        for ids, held, per_expert in self.picks:
            picked = ids.unique()
            read += int(((picked >= held.start) & (picked < held.stop)).sum()) * per_expert
        return read // max(1, self.steps)


def module_bytes(module) -> Iterator[tuple[str, int]]:  # noqa: ANN001 - an nn.Module
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        yield name, t.nbytes


def transformers_engine(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["torch_dtype"])).eval()
    load = time.perf_counter() - started
    past: list[Any] = [None]  # the running sequence's cache

    @torch.inference_mode()
    def forward(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=past[0], use_cache=True)
        past[0] = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def start(prompt: list[int]) -> torch.Tensor:
        past[0] = None
        return forward(torch.tensor([prompt]))

    return {**measure(job, load, start, forward), "weight_bytes_per_token": decode_bytes(module_bytes(model), job["routed_fraction"])}


def llama_cpp_engine(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        job["model"], n_ctx=job["context"], n_threads=job["threads"], n_threads_batch=job["threads"],
        n_batch=512, n_ubatch=512, logits_all=False, verbose=False,
    )
    load = time.perf_counter() - started

    def feed(tokens: list[int]) -> int:  # the last position's logits (llama-cpp-python keeps no copy without logits_all)
        llm.eval(tokens)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def start(prompt: list[int]) -> int:
        llm.reset()
        return feed(prompt)

    from gemma4.weights.gguf_header import read_gguf

    stored = [(t.name, t.data.nbytes) for t in read_gguf(Path(job["model"]))[1]]
    # its routing is not watched: counted as a token's top_k of the experts
    return {**measure(job, load, start, lambda token: feed([token])), "weight_bytes_per_token": decode_bytes(stored, job["routed_fraction"])}


ENGINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "gemma4": gemma4_engine,
    "transformers": transformers_engine,
    "llama.cpp": llama_cpp_engine,
}


def main() -> None:
    engine, job = sys.argv[1], json.loads(sys.argv[2])
    result = ENGINES[engine](job)
    if result is None:  # a rank that rank 0 reports for
        return
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
