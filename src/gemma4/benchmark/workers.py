"""One engine, measured in its own process (so peak memory is its own, and llama.cpp's OpenMP
never meets PyTorch's): load, cold start to the first token of a short prompt, prefill of a long
prompt, greedy decode. Prints one JSON object.

    python -m gemma4.benchmark.workers ENGINE '{"model": ..., "prompt": [...], ...}'
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: cold start counts them

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def gemma4_engine(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import gemma4
    from gemma4.runtime.generate import Batch

    torch.set_num_threads(job["threads"])
    timer = Timer()
    model = gemma4.load(job["model"], dtype=job.get("dtype"), quant=job.get("quant"), context=job["context"], progress=False)
    load = timer()
    lm = model.lm

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        batch = Batch(lm, [prompt], job["context"], model.prefill_chunk, 0)
        started = time.perf_counter()
        logits, _ = batch.start()
        token = logits.argmax(-1)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        done = torch.zeros(1, dtype=torch.bool)
        for _ in range(new_tokens - 1):
            token = batch.feed(token, done).argmax(-1)
        return prefill, time.perf_counter() - started, int(token)

    first_token = run(job["short_prompt"], 1)[0]
    cold = time.perf_counter() - STARTED
    prefill, decode, _ = run(job["prompt"], job["new_tokens"])
    return {"load_s": load, "cold_start_s": cold, "ttft_short_s": first_token, "prefill_s": prefill, "decode_s": decode,
            "weight_bytes_per_token": decode_bytes(lm)}


def decode_bytes(lm) -> int:  # noqa: ANN001 - a CausalLM
    """Weight bytes one decode step reads: every weight once (the token embedding as the tied LM
    head), except the PLE table, of which a token reads one row."""
    total = sum(t.nbytes for t in [*lm.parameters(), *lm.buffers()])
    ple = getattr(lm.model, "embed_tokens_per_layer", None)
    if ple is not None:
        total -= sum(t.nbytes for t in [*ple.parameters(), *ple.buffers()])
    return total


def transformers_engine(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(job["threads"])
    transformers.logging.set_verbosity_error()
    timer = Timer()
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["torch_dtype"]))
    model.eval()
    load = timer()

    @torch.inference_mode()
    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - started
        past = out.past_key_values
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - started, int(token)

    first_token = run(job["short_prompt"], 1)[0]
    cold = time.perf_counter() - STARTED
    prefill, decode, _ = run(job["prompt"], job["new_tokens"])
    return {"load_s": load, "cold_start_s": cold, "ttft_short_s": first_token, "prefill_s": prefill, "decode_s": decode}


def llama_cpp_engine(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    timer = Timer()
    llm = llama_cpp.Llama(
        job["model"], n_ctx=job["context"], n_threads=job["threads"], n_threads_batch=job["threads"],
        n_batch=512, n_ubatch=512, logits_all=False, verbose=False,
    )
    load = timer()

    def next_token() -> int:  # the last position's logits (llama-cpp-python keeps no copy without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        token = next_token()
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = next_token()
        return prefill, time.perf_counter() - started, token

    first_token = run(job["short_prompt"], 1)[0]
    cold = time.perf_counter() - STARTED
    prefill, decode, _ = run(job["prompt"], job["new_tokens"])
    return {"load_s": load, "cold_start_s": cold, "ttft_short_s": first_token, "prefill_s": prefill, "decode_s": decode}


ENGINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "gemma4": gemma4_engine,
    "transformers": transformers_engine,
    "llama.cpp": llama_cpp_engine,
}


def main() -> None:
    engine, job = sys.argv[1], json.loads(sys.argv[2])
    result = ENGINES[engine](job)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
