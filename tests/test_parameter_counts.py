"""`gemma4 info` parameter counts against the reference model built on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gemma4.config import ModelConfig
from gemma4.summary import summarize
from gemma4.weights.layout import checkpoint_tensors
from gemma4.weights.presets import FULL_SIZE, preset_config

transformers = pytest.importorskip("transformers")



def reference_state(name):
    with torch.device("meta"):
        model = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**preset_config(name)))
    # The tied LM head is not stored in checkpoints.
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_layout_equals_reference_tensor_for_tensor(name):
    ours = {s.name: s.shape for s in checkpoint_tensors(ModelConfig.from_dict(preset_config(name)))}
    assert ours == reference_state(name)


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_info_counts_match_reference(name):
    reference = reference_state(name)
    numel = {k: torch.Size(s).numel() for k, s in reference.items()}
    out = subprocess.run([sys.executable, "-m", "gemma4.interfaces.cli", "info", name, "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["total_parameters"] == sum(numel.values())
    assert info["parameters"]["vision"] == sum(n for k, n in numel.items() if "vision" in k)
    assert info["parameters"]["audio"] == sum(n for k, n in numel.items() if "audio" in k)
    assert info["parameters"]["ple_table"] == sum(n for k, n in numel.items() if k.endswith("embed_tokens_per_layer.weight"))
    assert info["parameters"]["experts"] == sum(n for k, n in numel.items() if ".router." in k or ".experts." in k)
    assert info["parameters"]["attention"] == sum(n for k, n in numel.items() if ".self_attn." in k and "language_model" in k)


def test_published_totals():
    """The headline numbers: E2B ~5.1B with a 2.35B PLE table; 26B-A4B ~25.2B stored."""
    e2b = summarize(ModelConfig.from_dict(preset_config("e2b")))
    assert round(e2b["total_parameters"] / 1e9, 1) == 5.1
    assert e2b["parameters"]["ple_table"] == 262_144 * 35 * 256
    moe = summarize(ModelConfig.from_dict(preset_config("26b-a4b")))
    assert 25.0e9 < moe["total_parameters"] < 26.0e9
