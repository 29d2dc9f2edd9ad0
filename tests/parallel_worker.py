"""One rank of the tensor-parallel tests, launched by the real `torchrun`:

    torchrun --nproc-per-node N tests/parallel_worker.py OUT JOBS.json

For each job ({"name", "path", "load": gemma4.load options}) it loads its part of the model with
tp=N and saves what the test compares with the single-process model: logits, greedy and sampled
tokens, the bytes of weights and K/V it holds. Mode "die" has the last rank exit mid-job instead,
"mismatch" has it load the checkpoint at "other"."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import gemma4
from gemma4.parallel.sharding import held_bytes
from gemma4.runtime.generate import Session, teacher_forced_logits


def ids(length: int, rows: int = 2) -> torch.Tensor:
    return torch.randint(3, 262_144, (rows, length), generator=torch.Generator().manual_seed(0))


def run(job: dict, out: Path, tp: int) -> None:
    path = job["other"] if job.get("mode") == "mismatch" and dist.get_rank() == tp - 1 else job["path"]  # the last rank loads another
    model = gemma4.load(path, tp=tp, progress=False, **job.get("load", {}))
    window = model.config.sliding_window
    prompt = ids(4 * window + 5)
    session = Session(model.lm, 256)
    session.start_prompt(prompt[0].tolist())
    result = {
        "logits": model(prompt),
        "decode": teacher_forced_logits(model.lm, prompt[0, : 2 * window + 3].tolist()),  # the decode path: cached one-token steps
        "greedy": model.generate(prompt[0, :9].tolist(), max_new_tokens=8, temperature=0),
        "batch": model.generate([prompt[0, :5].tolist(), prompt[1, :11].tolist()], max_new_tokens=4, temperature=0),
        "sampled": model.generate(prompt[1, :7].tolist(), max_new_tokens=8, temperature=1.0),  # no seed: ranks must agree
        "held": held_bytes(model.lm),
        "kv_bytes": session.nbytes(),
        "reductions": model.ranks.reductions,
    }
    torch.save(result, out / f"{job['name']}-rank{model.ranks.rank}.pt")


def die(job: dict, tp: int) -> None:
    """The last rank exits after loading, as a killed process would; the others must end with a clear error, not hang."""
    model = gemma4.load(job["path"], tp=tp, progress=False, **job.get("load", {}))
    if model.ranks.rank == tp - 1:
        os._exit(3)
    model.generate([2, 5, 6, 7], max_new_tokens=4, temperature=0)


def main() -> None:
    out, jobs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    for job in jobs:
        if job.get("mode") == "die":
            die(job, tp)
        else:
            run(job, out, tp)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
