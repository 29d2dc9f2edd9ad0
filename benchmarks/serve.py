"""`gemma4 serve` under load, beside llama.cpp's own server on the same weights, in one run.

    python benchmarks/serve.py CHECKPOINT [--quant int4] [--clients 1,2,4,8] [--new-tokens 64]
                               [--prefix-tokens 4096] [--llama-server PATH] [--results FILE]

For each server, over its OpenAI endpoint with streaming clients on loopback:
- time to first token of a request whose ~4K-token system prompt is new, then of the same system
  prompt with another question (the prefix cache at work), with the cached-token count;
- aggregate generated tokens/s with 1, 2, 4, 8 concurrent clients, each decoding --new-tokens
  tokens of its own prompt (stop tokens biased away, so every answer has the same length).
Our server loads CHECKPOINT saved as --quant (gemma4 quantize, cached beside it); llama.cpp the
same checkpoint converted by its own converter and quantizer to the type of the same size
(int4 -> Q4_0, int8 -> Q8_0, bf16 -> F16), with --parallel slots of the same context each.
llama-server comes from scripts/build_llama_server.sh."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from serving import Process, free_port  # noqa: E402

from gemma4.benchmark.peers import LLAMA_CPP_TYPE, gguf_for, quantized_for  # noqa: E402
from gemma4.weights.default_model import cache_dir  # noqa: E402

TEXT = (Path(__file__).parent.parent / "tests" / "data" / "declaration.txt").read_text()
STOP_BIAS = {"1": -100, "106": -100, "50": -100}  # <eos>, <turn|>, <|tool_response>: fixed-length answers


class Running(Process):
    def __init__(self, name: str, command: list[str], port: int):
        super().__init__(command, port, timeout=1800)
        self.name = name
        self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]


def streamed(server: Running, messages: list[dict], max_tokens: int) -> dict:
    """One streaming chat request -> time to first token, tokens, seconds, cached prompt tokens."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": STOP_BIAS}
    started, first, usage = time.perf_counter(), None, {}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=3600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name}: {response.status_code} {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and chunk.get("choices") and any(chunk["choices"][0]["delta"].get(k) for k in ("content", "reasoning_content")):
                first = time.perf_counter() - started
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft": first, "seconds": time.perf_counter() - started, "tokens": usage.get("completion_tokens", 0),
            "prompt": usage.get("prompt_tokens", 0), "cached": details.get("cached_tokens", usage.get("cached_tokens"))}


def document(server: Running, tokens: int) -> str:
    """About `tokens` tokens of English text, as the server's own tokenizer counts them."""
    words = TEXT.split() * 50
    count = lambda n: len(httpx.post(f"{server.url}/tokenize", json={"prompt": " ".join(words[:n])}).json()["tokens"])  # noqa: E731
    n = tokens
    for _ in range(3):  # words per token differ by tokenizer: converge on the count
        n = int(n * tokens / count(n))
    return " ".join(words[:n])


def measure(server: Running, clients: list[int], new_tokens: int, text: str) -> dict:
    system = {"role": "system", "content": "Answer from this document.\n\n" + text}
    streamed(server, [{"role": "user", "content": "warm up"}], 4)
    cold = streamed(server, [system, {"role": "user", "content": "Who wrote it?"}], 4)
    warm = streamed(server, [system, {"role": "user", "content": "When was it written?"}], 4)
    report = {"engine": server.name, "prompt_tokens": cold["prompt"], "ttft_cold": cold["ttft"], "ttft_cached": warm["ttft"],
              "cached_tokens": warm["cached"], "throughput": {}}
    for n in clients:
        results: list[dict] = []
        prompts = [[{"role": "user", "content": f"Client {i}: tell me about item {i * 7 + n} of the list."}] for i in range(n)]
        threads = [threading.Thread(target=lambda m=m: results.append(streamed(server, m, new_tokens))) for m in prompts]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        report["throughput"][n] = {"aggregate_tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
                                   "ttft_mean_s": sum(r["ttft"] or 0 for r in results) / n}
        print(f"  {server.name}: {n} clients -> {report['throughput'][n]['aggregate_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    return report


def markdown(reports: list[dict], clients: list[int]) -> str:
    lines = [f"| engine | TTFT, new {reports[0]['prompt_tokens']}-token prompt | TTFT, cached prefix (tokens cached) | "
             + " | ".join(f"{n} client{'s' if n > 1 else ''} tok/s" for n in clients) + " |",
             "|---|---|---|" + "---|" * len(clients)]
    for r in reports:
        rates = " | ".join(f"{r['throughput'][n]['aggregate_tok_s']:.2f}" for n in clients)
        lines.append(f"| {r['engine']} | {r['ttft_cold']:.2f} s | {r['ttft_cached']:.2f} s ({r['cached_tokens']}) | {rates} |")
    ours = reports[0]["throughput"]
    lines.append("")
    lines.append("gemma4 scaling: " + ", ".join(f"{n} clients {ours[n]['aggregate_tok_s'] / ours[clients[0]]['aggregate_tok_s']:.2f}x" for n in clients[1:]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--quant", default="int4", choices=list(LLAMA_CPP_TYPE))
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=8192, help="per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--llama-server", default=str(cache_dir() / "llama-server"))
    parser.add_argument("--engines", default="gemma4,llama.cpp")
    parser.add_argument("--results", help="append the Markdown table to this file")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    parallel = max(clients)
    reports, text = [], None
    if "gemma4" in args.engines:
        weights = quantized_for(args.checkpoint, args.quant) if args.quant != "bf16" else args.checkpoint
        port = free_port()
        ours = Running("gemma4", [sys.executable, "-m", "gemma4.interfaces.cli", "serve", str(weights), "--port", str(port),
                                  "--parallel", str(parallel), "--context", str(args.context)]
                       + (["--quant", "bf16"] if args.quant == "bf16" else []), port)
        try:
            text = document(ours, args.prefix_tokens)
            reports.append(measure(ours, clients, args.new_tokens, text))
        finally:
            ours.stop()
    if "llama.cpp" in args.engines and Path(args.llama_server).is_file():
        type_name = LLAMA_CPP_TYPE[args.quant]
        gguf = gguf_for(args.checkpoint, type_name)
        port = free_port()
        theirs = Running(f"llama.cpp {type_name}", [args.llama_server, "-m", str(gguf), "--port", str(port), "-np", str(parallel),
                                                   "-c", str(args.context * parallel), "-t", str(args.threads), "--jinja"], port)
        try:
            reports.append(measure(theirs, clients, args.new_tokens, text or document(theirs, args.prefix_tokens)))
        finally:
            theirs.stop()
    table = markdown(reports, clients)
    print(table)
    print(json.dumps(reports))
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n### Serving: {args.checkpoint.name}, {args.quant}, {args.new_tokens} new tokens per client, {args.threads} threads\n\n{table}\n")


if __name__ == "__main__":
    main()
