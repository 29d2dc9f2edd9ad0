"""Run in a fresh process: load a checkpoint, generate, and report resident memory as JSON,
overall and per memory-mapped file (from /proc/self/smaps)."""

from __future__ import annotations

import json
import resource
import sys
import time

import gemma4


def resident_by_file() -> dict[str, int]:
    out: dict[str, int] = {}
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and len(fields[1]) == 4:  # a mapping's header line
                current = fields[5] if len(fields) >= 6 and fields[5].startswith("/") else None
            elif fields[0] == "Rss:" and current:
                out[current] = out.get(current, 0) + int(fields[1]) * 1024
    return out


def resident() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def main(path: str, prompt: str, new_tokens: int) -> None:
    started = time.perf_counter()
    model = gemma4.load(path, progress=False)
    loaded = time.perf_counter()
    after_load = resident()
    model.generate(prompt, max_new_tokens=new_tokens, temperature=0)
    report = {
        "load_seconds": loaded - started,
        "generate_seconds": time.perf_counter() - loaded,
        "generated_tokens": model.stats.generated_tokens,
        "resident_after_load": after_load,
        "resident_after_generate": resident(),
        "peak_resident": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "resident_by_file": resident_by_file(),
    }
    print(json.dumps(report))


def peak(path: str, context: int, quant: str | None) -> None:
    """Fill a context: prefill context - 8 distinct tokens, decode 8; the peak resident memory and
    the cache's own byte count."""
    import torch

    from gemma4.runtime.generate import Batch

    model = gemma4.load(path, quant=quant, context=context, progress=False)
    prompt = [2, *torch.randperm(200_000, generator=torch.Generator().manual_seed(0))[: context - 9].add(1000).tolist()]
    batch = Batch(model.lm, [prompt], context, model.prefill_chunk, 0)
    token = batch.start()[0].argmax(-1)
    for _ in range(8):
        token = batch.feed(token, torch.zeros(1, dtype=torch.bool)).argmax(-1)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    print(json.dumps({"peak_resident": hwm, "kv_cache": batch.cache.nbytes_by_type(), "cached_tokens": batch.cache.length}))


if __name__ == "__main__":
    if sys.argv[1] == "--peak":
        peak(sys.argv[2], int(sys.argv[3]), None if sys.argv[4] == "as-saved" else sys.argv[4])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
