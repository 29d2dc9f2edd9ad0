"""`gemma4 synth PRESET OUT.gguf` writes what llama.cpp's own converter and quantizer write for the
synthetic checkpoint of the same preset and seed: the same metadata, tensors, types, order and
blocks, bit for bit. Checked on tiny configs that reach each of the quantizer's type rules (a Q6_K
embedding, Q8_0 and F16 fallbacks, PLE and double-wide MLPs, and Q8_0 files); llama.cpp runs
the file, and our engine loads it as the model it is."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemma4
from gemma4 import kernels
from gemma4.benchmark.peers import converter_script, llama_cpp_installed
from gemma4.errors import Gemma4Error
from gemma4.quant import packed
from gemma4.weights import synthesize
from gemma4.weights.gguf_synth import synthesize_gguf

from test_gguf import llama

pytestmark = pytest.mark.skipif(
    converter_script() is None or not llama_cpp_installed(), reason="llama.cpp is absent: run scripts/build_llama_cpp.sh"
)

WIDE_26B = dict(hidden_size=256, intermediate_size=96, moe_intermediate_size=64)  # every matrix in whole blocks, the embedding in 256-blocks
CASES = {
    "26b-like, Q4_0 with a Q6_K embedding": ("tiny-26b-a4b", WIDE_26B, "q4_0"),
    "26b-like, Q4_0 with Q8_0 and F16 fallbacks": ("tiny-26b-a4b", {}, "q4_0"),
    "e2b-like (PLE, double-wide MLP), Q8_0": ("tiny-e2b", {}, "q8_0"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(case) -> (the synthetic bf16 checkpoint folder, our GGUF of it), written once."""
    cache: dict[str, tuple] = {}

    def make(case: str):
        if case not in cache:
            preset, overrides, kind = CASES[case]
            root = tmp_path_factory.mktemp("synth")
            folder = synthesize(preset, root / "hf", dtype=torch.bfloat16, seed=7, overrides=overrides, progress=False)
            cache[case] = folder, synthesize_gguf(preset, root / "ours.gguf", kind, seed=7, overrides=overrides, progress=False)
        return cache[case]

    return make


def llama_cpp_pipeline(folder, target, kind: str):
    """The checkpoint through llama.cpp: its converter to BF16, then its quantizer."""
    script = converter_script()
    bf16 = target.with_suffix(".bf16.gguf")
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    result = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(bf16), "--outtype", "bf16"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{kind.upper()}\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(bf16), str(target)], capture_output=True, timeout=600).returncode == 0
    return target


def fields(reader) -> dict:
    # general.name is the converter's guess from the folder's name
    return {k: (tuple(t.name for t in f.types), f.contents()) for k, f in reader.fields.items() if k != "general.name"}


@pytest.mark.parametrize("case", list(CASES))
def test_synthetic_gguf_is_what_llama_cpp_writes(tmp_path, made, case):
    import gguf

    kind = CASES[case][2]
    folder, path = made(case)
    theirs = gguf.GGUFReader(llama_cpp_pipeline(folder, tmp_path / "theirs.gguf", kind))
    ours = gguf.GGUFReader(path)
    assert fields(ours) == fields(theirs)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape)) == (b.tensor_type, list(b.shape)), a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    types = {t.tensor_type.name for t in ours.tensors}
    assert {"q4_0": {"Q4_0", "F32"}, "q8_0": {"Q8_0", "F32"}}[kind] <= types


def test_llama_cpp_runs_it_and_we_read_the_same_model(made, monkeypatch):
    """llama.cpp loads and runs the file. We read it as the synthetic checkpoint with each weight
    rounded to its block type: dequantized, exactly that model; kept in its own types (every matrix
    and both expert stacks packed), the same model to round-off. (Tiny random models amplify
    llama.cpp's 8-bit activations into different logits, so its numbers are not compared here: its
    agreement is tested on F32 files in test_gguf.py, and this file equals its own bit for bit.)"""
    from gemma4.weights.gguf_file import dequantize, open_gguf, our_name

    folder, path = made("26b-like, Q4_0 with a Q6_K embedding")
    ids = [2, *range(1000, 1024)]
    ran = llama({"model": str(path), "logits_of": ids, "greedy": [ids], "new_tokens": 8})
    assert np.isfinite(ran["logits"]).all() and len(ran["greedy"][0]) == 8

    expected = gemma4.load(folder, dtype=torch.float32, progress=False)
    state = expected.lm.state_dict()
    with torch.no_grad():
        for t in open_gguf(path).tensors:
            if t.tensor_type.name != "F32":
                weight = state["model." + our_name(t.name)]
                weight.copy_(torch.from_numpy(dequantize(t)).reshape(weight.shape))
    batch = torch.tensor([ids])
    dequantized = gemma4.load(path, dtype=torch.float32, progress=False)(batch)
    assert torch.equal(dequantized, expected(batch))
    native = gemma4.load(path, progress=False)
    layer = native.lm.model.layers[0]
    experts = [layer.experts.packed(n) for n in ("gate_up_proj", "down_proj")]
    assert all(p.kind == "int4" and p.tiled and p[0]._streaming_kernel is not None for p in experts)  # kept packed, in the kernel's tiles
    # Kept in the file's types it is the same model: within the integer kernels' rounding of the activations
    # (two int8 halves per 32: the one-token kernels', and with AVX-512 VNNI the prompt kernel's), save
    # where a router's top-k is tied to within that rounding and a position takes the other expert (one of
    # these 25 did on an AMD Zen 3, none on an Intel Xeon: the machines' float sums differ); to fp32
    # round-off through the exact prompt kernel, where prompts take it.
    for streaming_rows in (packed.STREAMING_MAX_ROWS, 0):
        monkeypatch.setattr(packed, "STREAMING_MAX_ROWS", streaming_rows)
        if streaming_rows == 0 and not kernels.prompt_rounding():
            torch.testing.assert_close(native(batch), dequantized, atol=1e-3, rtol=0)  # (the largest apart: 2.8e-4)
        else:
            apart = (native(batch) - dequantized).abs().amax(-1)[0]
            assert (apart > 5e-2).sum().item() <= 1, apart


def test_refusals(tmp_path):
    with pytest.raises(Gemma4Error, match="one of q4_0, q8_0, not 'int4'"):
        synthesize_gguf("tiny-31b", tmp_path / "m.gguf", "int4")
    (tmp_path / "there.gguf").write_bytes(b"")
    with pytest.raises(Gemma4Error, match="already exists"):
        synthesize_gguf("tiny-31b", tmp_path / "there.gguf")


@pytest.mark.parametrize("case", ["26b-like, Q4_0 with a Q6_K embedding", "26b-like, Q4_0 with Q8_0 and F16 fallbacks"])
def test_plan_counts_the_file_as_loaded(made, case):
    """`gemma4 plan FILE.gguf` counts each tensor at what the loader makes of its type, byte for byte."""
    from gemma4.planner import plan_memory
    from gemma4.weights.gguf_file import gguf_loaded_bytes, open_gguf

    _, path = made(case)
    model = gemma4.load(path, progress=False)
    held = sum(t.nbytes for t in [*model.lm.parameters(), *model.lm.buffers()])
    stored = gguf_loaded_bytes(path)
    assert sum(stored.values()) == held
    planned = plan_memory(open_gguf(path).config, 512, quant="file's types", stored=stored)
    assert sum(planned["weights"].values()) == held
