"""Tensor and expert parallelism: tiny checkpoints over 2 and 4 local ranks (gloo, launched by the
real `torchrun`) give the single-process model's logits to fp32 round-off and, in fp32, its greedy
tokens exactly (packed decoding: within that path's own rounding), each rank holding 1/N of the
split weights and of the K/V cache.

The checkpoints are the tiny presets with heads to split: the presets' single global KV head does
not split, as E2B's does not (refused with a clear error)."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

import gemma4
from gemma4 import kernels
from gemma4.benchmark.peers import converter_script, gguf_for
from gemma4.errors import ConfigError, Gemma4Error
from gemma4.parallel.sharding import Shard, held_bytes
from gemma4.runtime.generate import teacher_forced_logits
from gemma4.weights import synthesize
from gemma4.weights.quantized import save_quantized

transformers = pytest.importorskip("transformers")

from conftest import reference_class  # noqa: E402
from parallel_worker import ids  # noqa: E402

HERE = Path(__file__).parent
SPLITTABLE = dict(num_attention_heads=8, num_key_value_heads=4, num_global_key_value_heads=4, head_dim=32, global_head_dim=64, intermediate_size=256)
MODELS = {"31b": ("tiny-31b", SPLITTABLE), "26b": ("tiny-26b-a4b", {**SPLITTABLE, "moe_intermediate_size": 64}), "e4b": ("tiny-e4b", {})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for name, (preset, overrides) in MODELS.items():
        made[name] = synthesize(preset, tmp_path_factory.mktemp(name), dtype=torch.float32, seed=7, progress=False, overrides=overrides)
    for name in ("31b", "26b"):
        made[f"{name}-int4"] = save_quantized(made[name], tmp_path_factory.mktemp(f"{name}-int4") / "q", "int4", progress=False)
    if converter_script() is not None:  # llama.cpp's own files, kept in their types: split in the memory map
        for kind in ("Q8_0", "Q4_0"):
            made[f"31b-{kind}"] = gguf_for(made["31b"], kind)
    return made


def torchrun(ranks: int, jobs: list[dict], out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    spec = out / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "GEMMA4_RANK_TIMEOUT": "60", "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(HERE / "parallel_worker.py"), str(out), str(spec)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


# Over 2 ranks every kind of checkpoint; over 4 (two processes per core here) one of each mechanism.
JOBS = {
    2: [("31b", {"dtype": "fp32"}), ("26b", {"dtype": "fp32"}), ("31b-int4", {}), ("26b-int4", {}), ("31b", {"quant": "int4"}),
        ("e4b", {"dtype": "fp32"}), ("31b-Q8_0", {}), ("31b-Q4_0", {})],
    4: [("31b", {"dtype": "fp32"}), ("26b", {"dtype": "fp32"}), ("31b-int4", {})],
}


@pytest.fixture(scope="module", params=[2, 4])
def ranked(request, folders, tmp_path_factory) -> tuple[int, Path, list[dict]]:
    """Every job run once over `ranks` processes; their results, per rank, in a folder."""
    ranks = request.param
    jobs = [{"name": f"{name}-{i}", "path": str(folders[name]), "load": load} for i, (name, load) in enumerate(JOBS[ranks]) if name in folders]
    out = tmp_path_factory.mktemp(f"tp{ranks}")
    result = torchrun(ranks, jobs, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return ranks, out, jobs


@functools.cache
def alone(path: str, load: str) -> gemma4.Model:
    """The single-process model a job's ranks are compared with (load: its options, as JSON)."""
    return gemma4.load(path, progress=False, **json.loads(load))


def results(out: Path, name: str, ranks: int) -> list[dict]:
    return [torch.load(out / f"{name}-rank{r}.pt") for r in range(ranks)]


def single_decode(single: gemma4.Model, prompt: torch.Tensor, window: int, threads: int | None = None) -> torch.Tensor:
    """The single process's decode path over the jobs' prompt, on `threads` threads (default: as many as it has)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return teacher_forced_logits(single.lm, prompt[0, : 2 * window + 3].tolist())
    finally:
        torch.set_num_threads(before)


def test_ranks_give_the_single_process_model(ranked):
    ranks, out, jobs = ranked
    for job in jobs:
        single = alone(job["path"], json.dumps(job["load"]))
        per_rank = results(out, job["name"], ranks)
        prompt = ids(4 * single.config.sliding_window + 5)
        for got in per_rank:  # every rank has the whole answer, the same bits
            for key in ("logits", "decode", "greedy", "batch", "sampled"):
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(per_rank[0][key])), (job, key)
        got = per_rank[0]
        window = single.config.sliding_window
        expected, expected_decode = single(prompt), single_decode(single, prompt, window)
        greedy = single.generate(prompt[0, :9].tolist(), max_new_tokens=8, temperature=0)
        batch = single.generate([prompt[0, :5].tolist(), prompt[1, :11].tolist()], max_new_tokens=4, temperature=0)
        if job["load"].get("dtype") == "fp32":
            # Against float64 truth: no further than the single process, give or take round-off; the same tokens.
            reference = reference_class(Path(job["path"])).from_pretrained(
                job["path"], dtype=torch.float64, attn_implementation="eager", experts_implementation="eager").eval()
            with torch.no_grad():
                truth = reference(input_ids=prompt).logits
            for ours, theirs, true in ((got["logits"], expected, truth), (got["decode"], expected_decode, truth[0, : 2 * window + 3])):
                single_error = (theirs.double() - true).abs().max().item()
                assert (ours.double() - true).abs().max().item() <= max(3 * single_error, 1e-5), job
            assert (got["greedy"], got["batch"]) == (greedy, batch), job
        else:
            # Packed: the same model, its partial sums added in another order. One-shot logits agree to round-off;
            # the decode path's own rounding of activations (to ~1e-5 of each block's largest value) is discontinuous,
            # so its steps agree to within that path's own distance from the one-shot model, and where a tiny random
            # model's two best tokens are that close, greedy may take either. A tiny random model amplifies that
            # rounding ~1000-fold, so the distance is taken over two orders of the single process's sums (its
            # threads: 1 and as many as it has), as the ranks' own order is another (one sample varied 2x here).
            # Where int4 prompts round their activations too (AVX-512 VNNI), the one-shot logits take the same
            # measure: their distance from the exact prompt path's.
            one_shot_noise = 1e-3 * expected.abs().max().item()
            if kernels.prompt_rounding():
                with patch.object(kernels, "prompt_rounding", lambda: False):
                    exact_prompts = single(prompt)
                one_shot_noise = max(one_shot_noise, 3 * (expected - exact_prompts).abs().max().item())
            assert (got["logits"] - expected).abs().max().item() <= one_shot_noise, job
            noise = max((decode - expected[0, : 2 * window + 3]).abs().max().item() for decode in (expected_decode, single_decode(single, prompt, window, threads=1)))
            assert (got["decode"] - expected_decode).abs().max().item() <= 3 * noise, job
            steps = teacher_forced_logits(single.lm, single.one_bos(prompt[0, :9].tolist()) + got["greedy"])[-len(got["greedy"]) - 1 : -1]
            chosen = steps.gather(1, torch.tensor(got["greedy"])[:, None])[:, 0]
            assert (steps.max(-1).values - chosen).max().item() <= 3 * noise, job


def test_each_rank_holds_its_share(ranked):
    """1/N of the split weights and of the K/V cache per rank; the replicated rest whole."""
    from gemma4.runtime.generate import Session

    ranks, out, jobs = ranked
    for job in jobs:
        single = alone(job["path"], json.dumps(job["load"]))
        whole = held_bytes(single.lm)
        session = Session(single.lm, 256)
        session.start_prompt(ids(4 * single.config.sliding_window + 5)[0].tolist())
        for got in results(out, job["name"], ranks):
            assert got["held"]["split"] * ranks == whole["split"], job
            assert got["held"]["replicated"] == whole["replicated"], job
            assert got["kv_bytes"] * ranks == session.nbytes(), job
            assert got["reductions"] > 0


def test_a_degree_the_heads_do_not_allow_is_refused(checkpoints):
    """E2B's single KV head does not split: a clear error says how far the model does."""
    from gemma4.config import ModelConfig

    text = ModelConfig.from_file(checkpoints("tiny-e2b") / "config.json").text
    with pytest.raises(ConfigError, match=r"KV heads of a layer \(1\) cannot be split 2 ways; this model splits over 1 ranks"):
        Shard(0, 2).config(text)
    with pytest.raises(Gemma4Error, match="torchrun --nproc-per-node 2"):
        gemma4.load(checkpoints("tiny-e2b"), tp=2, progress=False)


def test_a_dead_rank_ends_the_job_with_a_clear_error(folders, tmp_path):
    """Under torchrun, the launcher ends the others and names the rank that died; ranks started
    by hand (one per machine) find out in their next collective and say so, in one line."""
    job = {"name": "die", "path": str(folders["31b"]), "load": {"dtype": "fp32"}, "mode": "die"}
    result = torchrun(2, [job], tmp_path, timeout=200)
    assert result.returncode != 0
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 3" in result.stderr, result.stderr[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GEMMA4_RANK_TIMEOUT": "60", "PYTHONPATH": str(HERE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    command = [sys.executable, str(HERE / "parallel_worker.py"), str(tmp_path), str(tmp_path / "jobs.json")]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [rank.communicate(timeout=200)[1] for rank in ranks]
    assert ranks[1].returncode == 3 and ranks[0].returncode != 0
    assert "rank 0 of 2 lost the other ranks while summing a layer's output" in errors[0], errors[0][-3000:]


def test_ranks_with_different_checkpoints_are_refused(folders, tmp_path):
    jobs = [{"name": "mismatch", "path": str(folders["31b"]), "load": {"dtype": "fp32"}, "mode": "mismatch", "other": str(folders["31b-int4"])}]
    result = torchrun(2, jobs, tmp_path, timeout=200)
    assert result.returncode != 0
    assert "checkpoint and options differs from rank" in result.stderr, result.stderr[-3000:]


def test_the_server_answers_through_rank_0(folders):
    """`torchrun --nproc-per-node 2 -m gemma4 serve MODEL --tp 2`: the official client gets what the
    model answers alone — one prompt, a conversation that reuses and rolls back its cache (the other
    rank's cache follows), and streams decoded together."""
    import openai

    from serving import Process, free_port

    path = folders["31b"]
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gemma4", "serve", str(path),
               "--port", str(port), "--tp", "2", "--dtype", "fp32", "--parallel", "2", "--context", "512"]
    server = Process(command, port)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        alone = gemma4.load(path, dtype="fp32", context=512, progress=False)
        text = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, temperature=0).choices[0].text
        assert text == alone.generate("The capital of France is", 8, temperature=0)

        system = {"role": "system", "content": "You answer questions. " * 12}  # many sliding windows (8): rolling back restores a snapshot
        turns = [[system, {"role": "user", "content": "First question?"}], [system, {"role": "user", "content": "Another one?"}]]
        for messages in turns * 2:
            answer = client.chat.completions.create(model=name, messages=messages, max_tokens=6, temperature=0)
            alone.reset_chat()
            assert answer.choices[0].message.content == alone.chat(messages, 6, temperature=0).content
        assert answer.usage.prompt_tokens_details.cached_tokens > 0

        results: dict[int, str] = {}

        def stream(i: int) -> None:
            chunks = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=8,
                                                    temperature=0, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for i in range(3):
            alone.reset_chat()
            assert results[i] == alone.chat([{"role": "user", "content": f"Question {i}?"}], 8, temperature=0).content
    finally:
        log = server.stop()
    assert "src/gemma4/" not in log and "gemma4: error" not in log, log[-3000:]  # torchrun itself reports its SIGTERM with a traceback


def test_bench_runs_our_engine_over_ranks(folders):
    """`gemma4 bench --tp 2`: our engine under torchrun, rank 0 reporting the weight bytes all ranks
    read per token (the split parts once, each rank's replicated weights, the LM head's rows once)."""
    def bench(*extra: str) -> dict:
        command = [sys.executable, "-m", "gemma4", "bench", str(folders["31b"]), "--quant", "int4", "--engines", "gemma4", "--prompt-tokens", "16",
                   "--new-tokens", "4", "--context", "64", "--json", *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)["engines"]

    alone, split = bench()["gemma4 int4"], bench("--tp", "2")["gemma4 int4 --tp 2"]
    assert split["ranks"] == 2 and split["decode_tok_s"] > 0 and 0 < split["fraction_of_bound"] <= 1.0
    assert alone["weight_bytes_per_token"] < split["weight_bytes_per_token"] < 2 * alone["weight_bytes_per_token"]


def test_the_plan_per_rank_is_what_a_rank_holds(ranked):
    """`gemma4 plan --tp N`: a rank's weights and K/V, planned, are what each rank held."""
    from gemma4.config import ModelConfig
    from gemma4.planner import plan_memory

    ranks, out, jobs = ranked
    for job in jobs:
        if job["load"] != {"dtype": "fp32"}:
            continue
        config = ModelConfig.from_file(Path(job["path"]) / "config.json")
        plan = plan_memory(config, 4 * config.text.sliding_window + 5, dtype="fp32", shard=Shard(0, ranks))
        for got in results(out, job["name"], ranks):
            assert sum(plan["weights"].values()) + plan["ple_table"]["bytes"] == got["held"]["split"] + got["held"]["replicated"], job
            assert sum(plan["kv_cache"].values()) == got["kv_bytes"], job
