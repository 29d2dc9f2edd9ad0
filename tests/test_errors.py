"""Damaged or mismatched checkpoints: each gets one clear line naming the file and tensor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4
from gemma4.errors import Gemma4Error
from gemma4.weights import synthesize

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return synthesize("tiny-31b", tmp_path_factory.mktemp("pristine"), dtype=torch.bfloat16, progress=False)


@pytest.fixture
def broken(pristine, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(pristine, folder)
    return folder


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def truncate(folder: Path) -> None:
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-1000])


def corrupt_header(folder: Path) -> None:
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:20] = b"\x00garbage!{[}"
    path.write_bytes(bytes(data))


CASES = {
    "missing config": (lambda f: (f / "config.json").unlink(), r"no config\.json in .*ckpt"),
    "unknown model_type": (
        lambda f: edit_config(f, lambda c: c.update(model_type="llama")),
        r"config\.json: model_type 'llama' is not a Gemma 4 model",
    ),
    "missing tensor": (
        lambda f: edit_tensors(f, lambda t: t.pop("model.layers.3.mlp.up_proj.weight")),
        r"missing tensor 'model\.layers\.3\.mlp\.up_proj\.weight'",
    ),
    "unexpected tensor": (
        lambda f: edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)})),
        r"model\.safetensors: unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'",
    ),
    "wrong shape": (
        lambda f: edit_config(f, lambda c: c.update(intermediate_size=256)),
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\], "
        r"but config\.json implies \[256, 64\]",
    ),
    "wrong dtype": (
        lambda f: edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
        r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32",
    ),
    "truncated file": (truncate, r"model\.safetensors: truncated: tensor '.*' ends at byte \d+, file has \d+"),
    "corrupt file": (corrupt_header, r"model\.safetensors: corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_message(broken, case):
    damage, message = CASES[case]
    damage(broken)
    with pytest.raises(Gemma4Error, match=message):
        gemma4.load(broken, progress=False)


@pytest.mark.parametrize("case", ["missing tensor", "wrong shape", "corrupt file"])
def test_cli_reports_one_line_not_a_traceback(broken, case):
    damage, message = CASES[case]
    damage(broken)
    result = subprocess.run([sys.executable, "-m", "gemma4.interfaces.cli", "info", str(broken)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma4: error: "), result.stderr


def test_missing_shard(tmp_path):
    folder = synthesize("tiny-31b", tmp_path / "sharded", dtype=torch.bfloat16, shard_bytes=10_000_000, progress=False)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()
    with pytest.raises(Gemma4Error, match=rf"model\.safetensors\.index\.json lists {shards[1].name}, which is missing"):
        gemma4.load(folder, progress=False)


def test_synth_never_overwrites_a_checkpoint(pristine):
    before = (pristine / WEIGHTS).stat().st_mtime_ns
    with pytest.raises(Gemma4Error, match="already holds a checkpoint"):
        synthesize("tiny-31b", pristine, progress=False)
    assert (pristine / WEIGHTS).stat().st_mtime_ns == before


def test_unknown_dtype_is_refused(pristine):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        gemma4.load(pristine, dtype="int8")
