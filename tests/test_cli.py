"""The `gemma4` command as a user runs it (a real subprocess, real files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-m", "gemma4.interfaces.cli"]


def gemma4(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=300)


def test_run_streams_an_answer_and_reports_with_verbose(checkpoints):
    path = str(checkpoints("tiny-e2b", torch.bfloat16))
    result = gemma4("run", path, "Hello there", "--max-new-tokens", "6", "--temperature", "0", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "per-layer embeddings" in result.stderr and "in the checkpoint file" in result.stderr
    assert "sliding_attention: 8 layers (4 KV-shared)" in result.stderr and "tok/s" in result.stderr


def test_raw_run_matches_the_python_api(checkpoints):
    import gemma4 as api

    path = checkpoints("tiny-e2b", torch.bfloat16)
    result = gemma4("run", str(path), "Once upon", "--raw", "--max-new-tokens", "5", "--temperature", "0")
    expected = api.load(path, progress=False).generate("Once upon", 5, temperature=0)
    assert result.returncode == 0 and result.stdout == expected + "\n"


def test_cache_and_kernel_options_reach_the_model(checkpoints):
    """--kv-dtype and --fast-math load what gemma4.load(kv_dtype=, fast_math=) loads."""
    import gemma4 as api

    path = checkpoints("tiny-e2b", torch.bfloat16)
    options = ["--quant", "int4", "--kv-dtype", "int8", "--fast-math"]
    result = gemma4("run", str(path), "Once upon", "--raw", "--max-new-tokens", "5", "--temperature", "0", *options)
    model = api.load(path, progress=False, quant="int4", kv_dtype="int8", fast_math=True)
    assert model.kv_dtype == "int8" and model.fast_math
    assert result.returncode == 0 and result.stdout == model.generate("Once upon", 5, temperature=0) + "\n"


def test_interactive_chat(checkpoints):
    path = str(checkpoints("tiny-e2b", torch.bfloat16))
    script = "Hi\nMore\n/system Be brief\n/think\nAgain\n/reset\n/nope\nHello\n/exit\n"
    result = gemma4("chat", path, "--max-new-tokens", "4", "--temperature", "0", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("tok/s") == 4  # one report per answer
    for note in ("[system prompt set]", "[thinking on]", "[conversation cleared]", "[unknown command /nope"):
        assert note in result.stderr
    # the second answer reused the first turn's cache
    reports = [line for line in result.stderr.splitlines() if "tok/s" in line]
    assert "(0 cached)" not in reports[1]


def test_errors_are_one_line(checkpoints):
    path = str(checkpoints("tiny-e2b", torch.bfloat16))
    for args, message in [
        (["run", path, "word " * 200, "--context", "64"], "gemma4: error: the prompt is"),
        (["run", path, "hi", "--top-p", "0"], "gemma4: error: top_p must be in (0, 1]"),
        (["run", "/no/such/model", "hi"], "gemma4: error: /no/such/model: no such file or folder"),
    ]:
        result = gemma4(*args)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(message), result.stderr


def test_info_json_on_a_checkpoint(checkpoints):
    result = gemma4("info", str(checkpoints("tiny-e2b", torch.bfloat16)), "--json")
    info = json.loads(result.stdout)
    assert info["variant"] == "tiny-e2b" and info["bytes_by_dtype"]["BF16"] > 0


def test_quantize_then_run_the_saved_checkpoint(checkpoints, tmp_path):
    import gemma4 as api

    path, out = str(checkpoints("tiny-e2b", torch.bfloat16)), tmp_path / "int8"
    result = gemma4("quantize", path, str(out), "--quant", "int8")
    assert result.returncode == 0 and "wrote int8" in result.stdout, result.stderr
    result = gemma4("run", str(out), "Once upon", "--raw", "--max-new-tokens", "5", "--temperature", "0", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout == api.load(out, progress=False).generate("Once upon", 5, temperature=0) + "\n"
    assert "int8" in result.stderr  # --verbose names the table's packing
    again = gemma4("quantize", path, str(out), "--quant", "int4")  # never overwrite what the user has
    assert again.returncode == 2 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_bench_beside_llama_cpp_reports_bytes_and_bounds_never_exceeded(checkpoints, tmp_path):
    """`gemma4 bench` on a tiny checkpoint, both engines on the same weights in one run: every row has
    its bytes per token and its fraction of the bandwidth bound, none above 100 %."""
    from gemma4.benchmark.peers import converter_script, llama_cpp_installed

    if not (llama_cpp_installed() and converter_script()):
        pytest.skip("llama.cpp is not built (scripts/build_llama_cpp.sh)")
    folder = shutil.copytree(checkpoints("tiny-e2b"), tmp_path / "tiny")
    result = gemma4("bench", str(folder), "--quant", "int4", "--prompt-tokens", "16", "--new-tokens", "4", "--context", "64",
                    "--engines", "gemma4,llama.cpp", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["memory_bandwidth_gb_s"] > 0
    assert set(report["engines"]) == {"gemma4 int4", "llama.cpp Q4_0"}
    for row in report["engines"].values():
        assert row["weight_bytes_per_token"] > 0 and 0 < row["fraction_of_bound"] <= 1.0


def test_bench_counts_routed_experts_on_the_path_users_get(tmp_path):
    """The bench's count of expert bytes read watches the routers without forward hooks, so the MoE
    layers still run as compiled layer calls (model/one_token.py skips hooked layers): one token reads
    its top_k experts of every MoE layer, whole."""
    import gemma4
    from gemma4.benchmark.workers import RoutedExperts, module_bytes
    from gemma4.model import one_token
    from gemma4.runtime.generate import Session, decode_step
    from gemma4.weights.synth import synthesize

    path = synthesize("tiny-26b-a4b", tmp_path, dtype=torch.float32, seed=7, progress=False, overrides={"moe_intermediate_size": 32})
    lm = gemma4.load(path, quant="q4_0", progress=False).lm
    routed = RoutedExperts(lm)
    session = Session(lm, 64)
    session.start_prompt([2, 100, 200])
    with routed.counting():
        decode_step(lm, [session], [300])
    assert all(one_token.bind(layer, 1) is not None for layer in lm.model.layers)
    experts = routed.layers[0].experts
    per_expert = sum(size for _, size in module_bytes(experts)) // experts.gate_up_proj.shape[0]
    assert routed.bytes_per_step() == len(routed.layers) * lm.config.top_k_experts * per_expert
