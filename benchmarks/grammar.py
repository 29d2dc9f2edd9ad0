"""Which grammar engine constrains decoding cheapest over Gemma's 262K vocabulary on this CPU:
compile time and per-token mask time of llguidance, xgrammar and outlines-core, each driven
through the same JSON document token by token, with Google's real Gemma 3 vocabulary (the one
Gemma 4 shares: 262,144 entries). The server uses the winner (runtime/constrained.py).

    python benchmarks/grammar.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["city", "days", "unit", "tags"],
    "additionalProperties": False,
}
DOCUMENT = '{"city": "Paris, France", "days": 3, "unit": "celsius", "tags": ["weather", "week", "travel plans"]}'


def vocabulary():  # noqa: ANN201 - the project's Tokenizer over the real Gemma 3 vocabulary
    from gemma4.weights.default_model import default_model_path
    from gemma4.weights.gguf_file import gguf_tokenizer, open_gguf

    return gguf_tokenizer(open_gguf(default_model_path()))


def bench_llguidance(tokenizer, ids: list[int]) -> tuple[float, list[float]]:  # noqa: ANN001
    import llguidance
    import torch

    lltok = llguidance.LLTokenizer(tokenizer._backend.to_str(), n_vocab=len(tokenizer.vocab), eos_token=tokenizer.eos_id)
    mask = torch.zeros((len(tokenizer.vocab) + 31) // 32, dtype=torch.int32)
    started = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - started
    times = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        times.append(time.perf_counter() - t0)
        assert matcher.consume_token(token), matcher.get_error()
    return compile_s, times


def bench_xgrammar(tokenizer, ids: list[int]) -> tuple[float, list[float]]:  # noqa: ANN001
    import xgrammar

    vocab = [tokenizer.id_to_token.get(i, "") for i in range(len(tokenizer.vocab))]
    info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_FALLBACK, stop_token_ids=[tokenizer.eos_id])
    started = time.perf_counter()
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matcher = xgrammar.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - started
    mask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    times = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        times.append(time.perf_counter() - t0)
        assert matcher.accept_token(token)
    return compile_s, times


def bench_outlines(tokenizer, ids: list[int]) -> tuple[float, list[float]]:  # noqa: ANN001
    import outlines_core

    pieces: dict[str, list[int]] = {}
    for token, i in tokenizer.vocab.items():
        if i != tokenizer.eos_id:  # outlines matches decoded text: '▁' is a space, <0xNN> one byte
            byte = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
            text = chr(int(byte.group(1), 16)) if byte else token.replace("▁", " ")
            pieces.setdefault(text, []).append(i)
    started = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_id, pieces)
    index = outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - started
    times = []
    for token in ids:
        t0 = time.perf_counter()
        guide.get_tokens()
        times.append(time.perf_counter() - t0)
        guide.advance(token)
    return compile_s, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tokenizer = vocabulary()
    ids = tokenizer.encode(DOCUMENT)
    print(f"{len(tokenizer.vocab):,}-token vocabulary; a {len(ids)}-token JSON document; best of {args.repeat}")
    print("| engine | compile (ms) | mask per token, median (us) | mean (us) | worst (us) |\n|---|---|---|---|---|")
    for name, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines)):
        try:
            runs = [bench(tokenizer, ids) for _ in range(args.repeat)]
        except Exception as error:  # noqa: BLE001 - report an engine that cannot run here, measure the others
            print(f"| {name} | failed: {error} | | | |")
            continue
        compile_s = min(r[0] for r in runs)
        times = min((r[1] for r in runs), key=sum)
        print(f"| {name} | {compile_s * 1e3:.1f} | {statistics.median(times) * 1e6:.0f} | {statistics.mean(times) * 1e6:.0f} | {max(times) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
