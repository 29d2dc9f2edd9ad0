"""`gemma4 bench`: the same checkpoint through gemma4, transformers and llama.cpp, one after the
other in one run, each in a process of its own; every figure also as a ratio to ours, and each
engine's decode speed against the bound the machine's memory bandwidth sets for the weight bytes
it reads per token."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import kernels
from ..errors import Gemma4Error
from ..runtime import huge_pages
from .peers import LLAMA_CPP_TYPE, gguf_for, llama_cpp_installed, quantized_for

ENGINES = ("gemma4", "transformers", "llama.cpp")
FILE_TYPES = "file's types"  # a GGUF file's engines keep its tensors as they are stored


@dataclass
class BenchOptions:
    quant: str = "bf16"
    threads: int = 2
    context: int = 4096
    prompt_tokens: int = 512
    new_tokens: int = 128
    engines: tuple[str, ...] = ENGINES
    fast_math: bool = False
    seed: int = 0
    tp: int = 1  # ranks our engine runs on (torchrun on this machine; the threads shared among them)


def memory_bandwidth(threads: int) -> float:
    """Bytes per second `threads` threads read from RAM, as our weight kernels read (kernels/bandwidth.c)
    from the huge pages they stream (runtime/huge_pages.py: 4 KB pages read ~20 % slower); without the
    compiled kernels, a PyTorch reduction's rate (which reads slower: a lower bound)."""
    if kernels.available():
        return kernels.read_bandwidth(threads, huge_pages.allocate(1 << 30).fill_(1))
    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def prompts(vocab: int, options: BenchOptions) -> tuple[list[int], list[int]]:
    """A long and a short prompt of ordinary token ids (no special tokens), the same for every engine."""
    g = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(1000, vocab - 1000, (options.prompt_tokens + 8,), generator=g).tolist()
    return [2, *ids[: options.prompt_tokens - 1]], [2, *ids[-7:]]


def run_engine(engine: str, job: dict[str, Any]) -> dict[str, Any]:
    """One engine in a child process (ours over several ranks: one per rank, under torchrun) -> its
    measurements (or {"error": ...})."""
    tp = job.get("tp", 1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), "-m"] if tp > 1 else [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, job["threads"] // tp))} if tp > 1 else None
    result = subprocess.run([*launch, "gemma4.benchmark.workers", engine, json.dumps(job)], capture_output=True, text=True, timeout=3600, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["exit code %d" % result.returncode])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(checkpoint: Path, options: BenchOptions) -> dict[str, Any]:
    """`checkpoint`: a folder (ours packed as `options.quant`, llama.cpp on its converter's GGUF of the
    same type class), or a GGUF file both engines load as it is (ours in the file's own types, or
    repacked as `options.quant` when that is not FILE_TYPES)."""
    from ..weights import open_checkpoint
    from ..weights.gguf_file import open_gguf

    gguf_file = checkpoint.suffix == ".gguf"
    config = (open_gguf if gguf_file else open_checkpoint)(checkpoint).config
    long_prompt, short_prompt = prompts(config.text.vocab_size, options)
    base = {"prompt": long_prompt, "short_prompt": short_prompt, "new_tokens": options.new_tokens,
            "threads": options.threads, "context": options.context,
            "routed_fraction": (config.text.top_k_experts or 0) / config.text.num_experts if config.text.enable_moe_block else 1.0}
    bandwidth = memory_bandwidth(options.threads)
    rows: dict[str, dict[str, Any]] = {}
    for engine in options.engines:
        if engine == "gemma4":
            if gguf_file:
                model, quant = checkpoint, None if options.quant == FILE_TYPES else options.quant
            else:
                model = checkpoint if options.quant == "bf16" else quantized_for(checkpoint, options.quant)
                quant = "bf16" if options.quant == "bf16" else None
            job = {**base, "model": str(model), "quant": quant, "fast_math": options.fast_math, "tp": options.tp}
            label = f"gemma4 {options.quant}" + (" --fast-math" if options.fast_math else "") + (f" --tp {options.tp}" if options.tp > 1 else "")
        elif engine == "transformers":
            if options.quant != "bf16" or gguf_file:
                continue  # transformers has no CPU kernel of our int8/int4 formats (nor GGUF's): compared at bf16 only
            job, label = {**base, "model": str(checkpoint), "torch_dtype": "bfloat16"}, "transformers bf16"
        elif engine == "llama.cpp":
            if not llama_cpp_installed():
                print("gemma4 bench: llama.cpp skipped: llama-cpp-python is not installed (scripts/build_llama_cpp.sh)", file=sys.stderr)
                continue
            if gguf_file:
                job, label = {**base, "model": str(checkpoint)}, f"llama.cpp {FILE_TYPES}"
            else:
                type_name = LLAMA_CPP_TYPE[options.quant]
                job, label = {**base, "model": str(gguf_for(checkpoint, type_name))}, f"llama.cpp {type_name}"
        else:
            raise Gemma4Error(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
        print(f"gemma4 bench: running {label}...", file=sys.stderr, flush=True)
        rows[label] = _derived(run_engine(engine, job), options)
    ours = next((row for label, row in rows.items() if label.startswith("gemma4")), {})
    for row in rows.values():
        row["ratio_to_gemma4"] = {k: row[k] / ours[k] for k in RATIO_KEYS if k in row and ours.get(k)}
    # An engine that read faster than the probe proves the machine can: the bound is never exceeded.
    read_rates = [row["decode_tok_s"] * row["weight_bytes_per_token"] for row in rows.values() if "weight_bytes_per_token" in row]
    bound_bandwidth = max([bandwidth, *read_rates])
    for row in rows.values():
        if "weight_bytes_per_token" in row:
            row["decode_bound_tok_s"] = bound_bandwidth / row["weight_bytes_per_token"]
            row["fraction_of_bound"] = row["decode_tok_s"] / row["decode_bound_tok_s"]
    return {
        "checkpoint": str(checkpoint), "machine": _machine(), "options": options.__dict__,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "bound_bandwidth_gb_s": bound_bandwidth / 1e9,
        "engines": rows,
    }


RATIO_KEYS = ("load_s", "cold_start_s", "ttft_short_s", "prefill_tok_s", "decode_tok_s", "peak_rss_gb")


def _derived(raw: dict[str, Any], options: BenchOptions) -> dict[str, Any]:
    if "error" in raw:
        return raw
    return {
        **raw,
        "prefill_tok_s": options.prompt_tokens / raw["prefill_s"],
        "decode_tok_s": (options.new_tokens - 1) / raw["decode_s"],
        "peak_rss_gb": raw["peak_rss_bytes"] / 1e9,
    }


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch {torch.__version__}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown section: one row per engine, ratios to ours in parentheses."""
    o = report["options"]
    lines = [
        f"### {Path(report['checkpoint']).name}: {o['quant']}, {o['threads']} threads, "
        f"prompt {o['prompt_tokens']}, decode {o['new_tokens']} ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Machine: {report['machine']}; memory read bandwidth {report['memory_bandwidth_gb_s']:.1f} GB/s"
        + (f" (an engine read at {report['bound_bandwidth_gb_s']:.1f}: the bounds use that)"
           if report["bound_bandwidth_gb_s"] > report["memory_bandwidth_gb_s"] else ""),
        "",
        "| engine | load s | cold start to 1st token s | prefill tok/s | decode tok/s | weight MB read per token | decode, of its bound | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in report["engines"].items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | | | | |")
            continue
        ratio = row.get("ratio_to_gemma4", {})
        cell = lambda key, fmt: f"{row[key]:{fmt}}" + (f" ({ratio[key]:.2f}x)" if key in ratio and not label.startswith("gemma4") else "")  # noqa: E731
        lines.append(
            f"| {label} | {cell('load_s', '.2f')} | {cell('cold_start_s', '.2f')} | {cell('prefill_tok_s', '.1f')} "
            f"| {cell('decode_tok_s', '.2f')} | {row.get('weight_bytes_per_token', 0) / 1e6:,.0f} "
            f"| {row['fraction_of_bound']:.0%} of {row['decode_bound_tok_s']:.1f} tok/s | {cell('peak_rss_gb', '.2f')} |"
        )
    ours = next((row for label, row in report["engines"].items() if label.startswith("gemma4")), {})
    encode = [f"{kind} {ours[f'{kind}_encode_ms_per_token']:.1f} ms" for kind in ("image", "audio") if f"{kind}_encode_ms_per_token" in ours]
    if encode:
        lines += ["", "gemma4 encoders, per soft token: " + ", ".join(encode) + " (a 280-token image, a 10 s clip)"]
    return "\n".join(lines) + "\n"
