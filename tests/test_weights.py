"""Synthetic checkpoints are real safetensors checkpoints; loading maps them without copies."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import gemma4
from gemma4.errors import CheckpointError
from gemma4.weights import synthesize
from gemma4.weights.file_rows import FileRows
from gemma4.weights.safetensors_io import SafetensorsFile


def test_sharded_synth_is_read_by_the_safetensors_package(tmp_path):
    folder = synthesize("tiny-e4b", tmp_path / "a", dtype=torch.bfloat16, seed=3, shard_bytes=20_000_000, progress=False)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    total = 0
    for shard in shards:
        ours = SafetensorsFile(folder / shard)
        with safe_open(folder / shard, "pt") as reference:
            assert set(reference.keys()) == set(ours.tensors)
            for name in reference.keys():
                assert index["weight_map"][name] == shard
                expected = reference.get_tensor(name)
                assert expected.dtype == torch.bfloat16
                assert torch.equal(ours.tensor(name), expected)
                total += expected.numel() * 2
    assert index["metadata"]["total_size"] == total


def test_synth_is_seeded(tmp_path):
    a = synthesize("tiny-31b", tmp_path / "a", seed=1, progress=False)
    b = synthesize("tiny-31b", tmp_path / "b", seed=1, progress=False)
    c = synthesize("tiny-31b", tmp_path / "c", seed=2, progress=False)
    read = lambda f: SafetensorsFile(f / "model.safetensors").tensor("model.layers.5.self_attn.k_proj.weight")  # noqa: E731
    assert torch.equal(read(a), read(b)) and not torch.equal(read(a), read(c))


def test_matching_dtype_loads_without_copying(checkpoints):
    """bf16 weights loaded as bf16 are views into the memory-mapped file, not copies."""
    path = checkpoints("tiny-e2b", torch.bfloat16)
    file_size = (path / "model.safetensors").stat().st_size
    model = gemma4.load(path, dtype=torch.bfloat16, progress=False).lm
    for name, tensor in model.state_dict().items():
        assert tensor.untyped_storage().nbytes() == file_size, name


def test_row_tables_keep_their_stored_dtype(checkpoints):
    """The per-layer-embedding table is read a row per token: it stays bf16 and mapped in fp32 mode."""
    path = checkpoints("tiny-e2b", torch.bfloat16)
    model = gemma4.load(path, dtype=torch.float32, progress=False).lm
    assert model.model.embed_tokens_per_layer.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_row_tables_are_read_from_the_file(checkpoints, tmp_path):
    """The PLE table's rows are read from the file (pread, weights/file_rows.py), not through the map:
    the mapped tensor's rows, in its dtype; a bad id fails as an embedding's does, a cut file by name."""
    model = gemma4.load(checkpoints("tiny-e2b", torch.bfloat16), dtype=torch.float32, progress=False).lm
    table = model.model.embed_tokens_per_layer
    in_file = table.stored_rows["weight"]
    assert isinstance(in_file, FileRows) and in_file.stands_in_for(table.weight)
    rows = table.weight.shape[0]
    ids = torch.tensor([[0, 7, rows - 1], [3, 7, 0]])
    assert torch.equal(in_file[ids], table.weight[ids]) and in_file[ids].dtype == torch.bfloat16
    with pytest.raises(IndexError, match="outside a table"):
        table(torch.tensor([[rows]]))
    with torch.no_grad():  # a weight edited in place is read from the edit
        table.weight[7] = 1.0
    assert not in_file.stands_in_for(table.weight) and torch.equal(table(ids), table.weight[ids] * torch.tensor(table.scale, dtype=torch.bfloat16))
    cut = tmp_path / "cut.bin"
    cut.write_bytes(bytes(100))
    with pytest.raises(CheckpointError, match="cut.bin: truncated"):
        FileRows(cut, 0, (4, 16), torch.bfloat16)[torch.tensor([3])]


def test_rotary_tables_match_reference_far_out(checkpoints):
    """Proportional RoPE is where ports go wrong silently: compare cos/sin at positions past 100K."""
    transformers = pytest.importorskip("transformers")
    path = checkpoints("tiny-e2b")
    ours = gemma4.load(path, progress=False)
    config = transformers.AutoConfig.from_pretrained(path)
    reference = transformers.models.gemma4.modeling_gemma4.Gemma4TextRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 511, 4096, 100_003, 131_071, 262_143]])
    from gemma4.model.rope import rotary_tables

    for plan in (ours.plan[0], ours.plan[4]):  # sliding, global
        cos, sin = rotary_tables(plan.rope, positions, torch.float32)
        ref_cos, ref_sin = reference(torch.zeros(1, dtype=torch.float32), positions, plan.attention_type)
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    # Only the first quarter of the global layers' frequency pairs rotate.
    cos, _ = rotary_tables(ours.plan[4].rope, positions, torch.float32)
    pairs = ours.plan[4].head_dim // 2
    assert torch.all(cos[..., pairs // 4 : pairs] == 1) and not torch.all(cos[0, -1, : pairs // 4] == 1)
