"""Tensor parallelism on one machine: decode and prefill speed, all-reduce traffic and each rank's
memory, for 1, 2 and 4 ranks (gloo, launched by torchrun), on one synthetic 31B-like checkpoint;
then, from the measured traffic, what a split over two machines would cost on paper.

    python benchmarks/parallel.py [--ranks 1,2,4] [--quant int4] [--layers 8] [--out DIR]

On a machine with few cores this measures the cost of communication, not a speed-up: N ranks
share the same cores and the same memory bandwidth."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# A 31B-like layer (the release's 5376 wide, 32 query / 16 KV heads, 4 global KV heads) at half the width.
SHAPE = dict(hidden_size=2688, intermediate_size=10752, num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=4,
             head_dim=128, global_head_dim=256)


def resident(checkpoint: str) -> dict[str, int]:
    """This process's resident bytes: its own (anonymous), the pages of the checkpoint it maps (ranks on
    one machine share them), and its peak."""
    own = mapped = 0
    in_checkpoint = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's header: address range, permissions, ..., path
            in_checkpoint = line.split()[-1].startswith(str(Path(checkpoint).resolve()))
        elif line.startswith("Rss:") and in_checkpoint:
            mapped += int(line.split()[1]) * 1024
        elif line.startswith("Anonymous:"):
            own += int(line.split()[1]) * 1024
    peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return {"own": own, "mapped": mapped, "peak": peak}


def worker(path: str, prompt_tokens: int, new_tokens: int, out: str) -> None:
    import torch.distributed as dist

    import gemma4
    from gemma4.parallel.sharding import held_bytes

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    started = time.perf_counter()
    model = gemma4.load(path, tp=tp, progress=False)
    load_seconds = time.perf_counter() - started
    ids = torch.randint(3, model.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    model.generate(ids[:16], max_new_tokens=4, temperature=0)  # warm up
    ranks = model.ranks
    counters = lambda: torch.tensor([ranks.reductions, ranks.reduced_bytes, ranks.gathered_bytes], dtype=torch.float64)  # noqa: E731
    before = counters()
    model.generate(ids, max_new_tokens=1, temperature=0)  # the prompt alone: no decode step
    prefill = counters() - before
    before = counters()
    model.generate(ids, max_new_tokens=new_tokens, temperature=0)
    stats = model.stats
    steps = stats.generated_tokens - 1  # decode steps: the first token comes from the prefill
    decode = ((counters() - before - prefill) / steps).tolist()
    probe, latency = torch.zeros(model.config.hidden_size), 0.0  # one decode step's all-reduce, alone
    if tp > 1:
        for _ in range(20):
            dist.all_reduce(probe)
        started = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(probe)
        latency = (time.perf_counter() - started) / 200
    held = held_bytes(model.lm)
    report = {
        "rank": model.ranks.rank, "ranks": tp, "load_seconds": load_seconds,
        "prefill_tokens_per_second": stats.prompt_tokens / stats.prefill_seconds,
        "decode_tokens_per_second": stats.decode_tokens_per_second,
        "reductions_per_decode_token": decode[0], "reduced_bytes_per_decode_token": decode[1], "gathered_bytes_per_decode_token": decode[2],
        "reduced_bytes_per_prompt_token": prefill[1].item() / stats.prompt_tokens,
        "held": held, "resident": resident(path), "all_reduce_seconds": latency,
    }
    Path(out, f"rank{report['rank']}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def split_share(alone: dict, folder: Path) -> float:
    """The share of a decode step's weight reads that ranks split: the split layers and the LM head
    (the tied embeddings, read whole for the logits; their lookup reads a row)."""
    import gemma4

    head = gemma4.load(folder, progress=False).lm.model.embed_tokens
    head_bytes = sum(t.nbytes for t in head.state_dict().values())
    return (alone["held"]["split"] + head_bytes) / (alone["held"]["split"] + alone["held"]["replicated"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", help="keep the synthetic checkpoint here (default: a temporary folder)")
    parser.add_argument("--network-gbps", default="10,25,100", help="links to price the two-machine split at")
    parser.add_argument("--latency-us", type=float, default=100.0, help="one all-reduce's fixed cost between two machines (gloo over TCP)")
    args = parser.parse_args()

    from gemma4.weights import synthesize
    from gemma4.weights.quantized import save_quantized

    root = Path(args.out or tempfile.mkdtemp(prefix="gemma4-tp-"))
    source, folder = root / "bf16", root / args.quant
    if not (source / "config.json").is_file():
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(args.layers)]
        synthesize("tiny-31b", source, dtype=torch.bfloat16, progress=True,
                   overrides={**SHAPE, "num_hidden_layers": args.layers, "layer_types": layer_types, "sliding_window": 1024})
    if not (folder / "config.json").is_file():  # quantized once, so that each rank maps its part instead of quantizing
        save_quantized(source, folder, args.quant)
    rows = []
    for ranks in map(int, args.ranks.split(",")):
        out = tempfile.mkdtemp(prefix=f"tp{ranks}-")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), __file__, "--worker",
                   str(folder), str(args.prompt_tokens), str(args.new_tokens), out]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        run = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True)
        if run.returncode:
            sys.exit(f"{ranks} rank(s) failed:\n{run.stderr[-3000:]}")
        reports = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
        rows.append(reports)
        first = reports[0]
        print(f"{ranks} rank(s): prefill {first['prefill_tokens_per_second']:.1f} tok/s, decode {first['decode_tokens_per_second']:.2f} tok/s; "
              f"a decode step sums {first['reductions_per_decode_token']:.0f} tensors over ranks ({first['reduced_bytes_per_decode_token'] / 1e3:.1f} KB) "
              f"and gathers {first['gathered_bytes_per_decode_token'] / 1e3:.1f} KB of logits per rank, "
              f"a prompt token {first['reduced_bytes_per_prompt_token'] / 1e3:.1f} KB; per rank: split weights {first['held']['split'] / 1e6:.0f} MB, "
              f"replicated {first['held']['replicated'] / 1e6:.0f} MB; resident {max(r['resident']['own'] for r in reports) / 1e6:.0f} MB own + "
              f"{max(r['resident']['mapped'] for r in reports) / 1e6:.0f} MB of the mapped checkpoint (peak {max(r['resident']['peak'] for r in reports) / 1e6:.0f} MB); "
              f"one all-reduce of a token's hidden state, alone: {first['all_reduce_seconds'] * 1e6:.0f} us",
              flush=True)
    two = next((r[0] for r in rows if r[0]["ranks"] == 2), None)
    alone = next((r[0] for r in rows if r[0]["ranks"] == 1), None)
    if two and alone:
        # Two machines, one rank each: the split part of a decode step's weight reads halves (the replicated rest
        # is still read whole), and each all-reduce (and the logits' gather) pays a fixed latency plus its traffic:
        # 2 (N-1)/N of a summed tensor per rank, a rank's logits once.
        step = 1 / alone["decode_tokens_per_second"]
        compute = step * (1 - split_share(alone, folder) / 2)
        sent = two["reduced_bytes_per_decode_token"] * 2 * (2 - 1) / 2 + two["gathered_bytes_per_decode_token"]
        latencies = [(args.latency_us, "us per collective"), (two["all_reduce_seconds"] * 1e6, "us per collective, as between ranks here")]
        for (latency_us, source), gbps in [(lat, g) for lat in latencies for g in map(float, args.network_gbps.split(","))]:
            wire = (two["reductions_per_decode_token"] + 1) * latency_us * 1e-6 + sent / (gbps * 1e9 / 8)
            print(f"on paper, two machines like this one over {gbps:g} Gb/s ({latency_us:.0f} {source}): a {step * 1e3:.0f} ms "
                  f"decode step becomes {compute * 1e3:.0f} ms of compute + {wire * 1e3:.2f} ms on the wire: {1 / (compute + wire):.1f} tok/s "
                  f"({step / (compute + wire):.2f}x one machine)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
