"""Run llama.cpp (llama-cpp-python) in its own process and print JSON: the logits of a token
sequence, greedy continuations, or a perplexity. Separate from torch so the two OpenMP
runtimes never share a process."""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    request = json.load(sys.stdin)
    llm = Llama(request["model"], n_ctx=request.get("n_ctx", 512), logits_all=True, verbose=False, n_threads=2)
    out: dict = {}
    if "logits_of" in request:
        ids = request["logits_of"]
        llm.eval(ids)
        out["logits"] = np.asarray(llm.scores[: len(ids)], dtype=np.float32).tolist()
    if "tokenize" in request:
        out["tokens"] = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in request["tokenize"]]
    if "greedy" in request:
        out["greedy"] = []
        for ids in request["greedy"]:
            llm.reset()
            llm.eval(ids)
            new: list[int] = []
            for _ in range(request["new_tokens"]):
                new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval(new[-1:])
            out["greedy"].append(new)
    if "perplexity_of" in request:
        ids = request["perplexity_of"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -log_probs[np.arange(len(ids) - 1), ids[1:]].mean()
        out["perplexity"] = float(np.exp(nll))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
