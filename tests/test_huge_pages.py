"""The streamed weights in huge pages (runtime/huge_pages.py): the same bytes, so the same logits, in
one region that starts on a huge page, and each weight held once (the file pages behind a moved
weight let go)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gemma4
from gemma4.quant.modules import PackedLinear
from gemma4.runtime import huge_pages
from gemma4.runtime.generate import teacher_forced_logits
from gemma4.weights.gguf_synth import synthesize_gguf
from gemma4.weights.quantized import save_quantized

pytestmark = pytest.mark.skipif(not huge_pages.available(), reason="this system gives no transparent huge pages")

TEXT = [2, 818, 5279, 529, 3730, 236764, 1304, 8974, 531, 506, 5906, 17454, 236761]


@pytest.fixture(scope="module")
def saved_int4(checkpoints, tmp_path_factory):
    return save_quantized(checkpoints("tiny-e2b", torch.bfloat16), tmp_path_factory.mktemp("int4") / "q", "int4", progress=False)


@pytest.fixture(scope="module")
def q4_0_gguf(tmp_path_factory):
    return synthesize_gguf("tiny-26b-a4b", tmp_path_factory.mktemp("gguf") / "m.gguf", "q4_0", seed=7, progress=False)


def _streamed_buffers(lm) -> list[torch.Tensor]:
    linears = [b for m in lm.modules() if isinstance(m, PackedLinear) for b in m.buffers()]
    return linears + list(lm.model.embed_tokens.buffers())


@pytest.mark.parametrize("source", ["saved_int4", "q4_0_gguf"])
def test_moved_weights_give_the_same_logits_from_one_huge_page_region(source, request, monkeypatch):
    """A saved int4 folder (weights viewed in the file's mapping) and a Q4_0 GGUF (repacked on the heap;
    the 26B-A4B's experts stay where they are): prompt and token-by-token logits equal to the last bit."""
    path = request.getfixturevalue(source)
    moved = gemma4.load(path, progress=False)
    with monkeypatch.context() as m:
        m.setattr(huge_pages, "available", lambda: False)
        kept = gemma4.load(path, progress=False)
    buffers = _streamed_buffers(moved.lm)
    start = min(b.data_ptr() for b in buffers)
    assert start % huge_pages.HUGE_PAGE == 0
    assert max(b.data_ptr() + b.nbytes for b in buffers) - start < sum(b.nbytes for b in buffers) + 64 * len(buffers)
    assert torch.equal(moved(torch.tensor([TEXT])), kept(torch.tensor([TEXT])))
    assert torch.equal(teacher_forced_logits(moved.lm, TEXT), teacher_forced_logits(kept.lm, TEXT))


def test_a_large_heap_held_table_stays_where_it_is(q4_0_gguf, monkeypatch):
    """A heap-held original above the limit (the GGUF's repacked LM head table, with the limit lowered
    below it) is not copied, since a copy would raise the load's peak by its size; the rest are."""
    kept = gemma4.load(q4_0_gguf, progress=False)
    limit = kept.lm.model.embed_tokens.weight.nbytes - 1
    monkeypatch.setattr(huge_pages, "_LARGEST_HEAP_COPY", limit)
    moved = gemma4.load(q4_0_gguf, progress=False)
    table, others = moved.lm.model.embed_tokens.weight, [b for b in _streamed_buffers(moved.lm) if b.nbytes <= limit]
    start, end = min(b.data_ptr() for b in others), max(b.data_ptr() + b.nbytes for b in others)
    assert start % huge_pages.HUGE_PAGE == 0 and end - start < sum(b.nbytes + 64 for b in others)  # the rest in one region
    assert not start <= table.data_ptr() < end
    assert torch.equal(moved(torch.tensor([TEXT])), kept(torch.tensor([TEXT])))


RESIDENT = """
import json, sys, torch
import gemma4
from gemma4.runtime import huge_pages
if sys.argv[2] == "off":
    huge_pages.available = lambda: False
model = gemma4.load(sys.argv[1], progress=False)
model(torch.tensor([[2, 818, 5279, 529]]))  # every streamed weight read once
rss = [int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmRSS")][0]
print(json.dumps({"rss": rss}))
"""


def test_a_moved_weight_is_held_once(saved_int4):
    """In fresh processes, a forward after loading the saved int4 folder: resident no more with the weights
    moved than with them read from the file's mapping (the 9.7 MB moved would show twice otherwise)."""

    def resident(setting: str) -> int:
        out = subprocess.run([sys.executable, "-c", RESIDENT, str(saved_int4), setting], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["rss"]

    off, on = resident("off"), resident("on")
    assert on < off + 5 * 2**20, (on, off)  # (2 MB more measured: the region's last huge page, partly used; 11 MB more if a copy is held twice)


def test_a_weight_mapped_from_a_file_since_replaced_is_copied_as_mapped(tmp_path):
    """Weights are read back from the file they were mapped from only while it is that file: one replaced
    on disk since (a checkpoint saved again under the same name) is copied from the mapping."""
    from safetensors.torch import save_file

    from gemma4.weights.safetensors_io import SafetensorsFile

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(1 << 20, dtype=torch.int32)}, path)
    mapped = SafetensorsFile(path).tensor("w")
    assert int(mapped[-1]) == (1 << 20) - 1  # (its pages faulted in)
    (tmp_path / "new.safetensors").write_bytes(b"\0" * path.stat().st_size)
    (tmp_path / "new.safetensors").replace(path)
    into = torch.zeros(mapped.nbytes, dtype=torch.uint8)
    huge_pages._copy_releasing(mapped, into, huge_pages._FileMappings().of(mapped))
    assert torch.equal(into.view(torch.int32), torch.arange(1 << 20, dtype=torch.int32))
