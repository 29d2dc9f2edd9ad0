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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
