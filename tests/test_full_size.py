"""A full-size synthetic E2B (10.2 GB, the release's exact layout): the per-layer-embedding table
(2.35B parameters, 4.7 GB) stays in the memory-mapped file and only the rows of seen tokens are read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemma4.weights import open_checkpoint, synthesize
from gemma4.weights.layout import decoder_prefix

PLE_TABLE = "model.language_model.embed_tokens_per_layer.weight"
GB = 10**9


NEEDS_FREE = 11 * GB  # the checkpoint, and room for every other test's files beside it


@pytest.fixture(scope="module")
def full_e2b(tmp_path_factory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("e2b")
    free = shutil.disk_usage(folder).free
    if free < NEEDS_FREE:  # a disk filled halfway through would fail every later test, not only these
        pytest.skip(f"a full-size E2B needs {NEEDS_FREE / GB:.0f} GB free in {folder.parent}; {free / GB:.1f} GB are")
    try:
        yield synthesize("e2b", folder, progress=False)
    finally:
        shutil.rmtree(folder)  # 10 GB, written whole or not: never left for pytest's kept temporary folders


def test_ple_table_stays_on_disk(full_e2b):
    checkpoint = open_checkpoint(full_e2b)
    table = checkpoint.tensors[PLE_TABLE]
    table_bytes = table.end - table.start
    assert table_bytes == 262_144 * 35 * 256 * 2
    prefix = decoder_prefix(checkpoint.config)
    other_decoder_bytes = sum(
        t.end - t.start for name, t in checkpoint.tensors.items() if name.startswith(prefix) and name != PLE_TABLE
    )
    same_file_other_bytes = sum(
        t.end - t.start for name, t in checkpoint.tensors.items() if t.file == table.file and name != PLE_TABLE
    )

    probe = Path(__file__).parent / "probes" / "memory_probe.py"
    out = subprocess.run([sys.executable, str(probe), str(full_e2b), "The capital of France is", "3"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    print(json.dumps({k: v for k, v in report.items() if k != "resident_by_file"}))

    # Loading maps the files: almost nothing is resident until it is used.
    assert report["resident_after_load"] < 1 * GB
    # After generating, every other decoder weight may be resident, plus the runtime; the table may not.
    assert report["resident_after_generate"] < other_decoder_bytes + 1.2 * GB < table_bytes + other_decoder_bytes
    # The file holding the table is resident only for its other tensors and a few table rows.
    table_file_resident = report["resident_by_file"].get(str(table.file), 0)
    assert table_file_resident < same_file_other_bytes + 64 * 2**20, (table_file_resident, same_file_other_bytes)


@pytest.mark.parametrize("context", [512, 2048])
def test_measured_peak_memory_is_the_plan(full_e2b, context):
    """Prefill and decode a full context in a fresh process: the cache holds exactly the planned
    K/V bytes, and the peak resident memory is within 10 % of the planned total."""
    from gemma4.planner import plan_memory, tokenizer_bytes
    from gemma4.runtime.tokenizer import tokenizer_counts

    probe = Path(__file__).parent / "probes" / "memory_probe.py"
    out = subprocess.run([sys.executable, str(probe), "--peak", str(full_e2b), str(context), "bf16"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    plan = plan_memory(open_checkpoint(full_e2b).config, context, quant="bf16", tokenizer=tokenizer_bytes(*tokenizer_counts(full_e2b)))
    print(f"context {context}: measured peak {measured['peak_resident'] / GB:.3f} GB, planned {plan['total_resident'] / GB:.3f} GB")
    assert measured["cached_tokens"] == context
    assert measured["kv_cache"] == plan["kv_cache"]
    assert abs(measured["peak_resident"] - plan["total_resident"]) <= 0.1 * plan["total_resident"]
