"""The layer plan of each published model, and both config.json dialects resolving to it."""

from __future__ import annotations

import json

import pytest

from gemma4.config import ModelConfig, TextConfig
from gemma4.errors import ConfigError
from gemma4.plan import build_plan
from gemma4.weights.presets import FULL_SIZE, preset_config


def plan_of(name):
    return build_plan(ModelConfig.from_dict(preset_config(name)).text)


def test_e2b_plan():
    plan = plan_of("e2b")
    assert len(plan) == 35
    assert [p.attention_type == "full_attention" for p in plan] == [(i + 1) % 5 == 0 for i in range(35)]
    assert {p.sliding_window for p in plan if p.is_sliding} == {512}
    assert {(p.head_dim, p.num_kv_heads) for p in plan if p.is_sliding} == {(256, 1)}
    assert {(p.head_dim, p.num_kv_heads) for p in plan if not p.is_sliding} == {(512, 1)}
    # The last 20 layers share: sliding ones read layer 13, global ones layer 14.
    assert [p.kv_source for p in plan[:15]] == list(range(15))
    assert {p.kv_source for p in plan[15:] if p.is_sliding} == {13}
    assert {p.kv_source for p in plan[15:] if not p.is_sliding} == {14}
    assert [p.mlp_width for p in plan] == [6144] * 15 + [12288] * 20  # double-wide on shared layers
    assert all(p.ple_dim == 256 and not p.moe and not p.k_eq_v for p in plan)
    sliding, full = plan[0].rope, plan[4].rope
    assert (sliding.theta, sliding.rotated_pairs) == (10_000.0, 128)
    assert (full.theta, full.rotated_pairs) == (1_000_000.0, 64)  # 25 % of 256 pairs


def test_e4b_plan():
    plan = plan_of("e4b")
    assert len(plan) == 42 and sum(not p.is_sliding for p in plan) == 7
    assert {p.num_kv_heads for p in plan} == {2}
    assert [p.owns_kv for p in plan] == [True] * 24 + [False] * 18
    assert {p.kv_source for p in plan[24:] if p.is_sliding} == {22}
    assert {p.kv_source for p in plan[24:] if not p.is_sliding} == {23}
    assert {p.mlp_width for p in plan} == {10240}


def test_26b_a4b_plan():
    plan = plan_of("26b-a4b")
    assert len(plan) == 30 and all(p.moe and p.owns_kv and p.ple_dim == 0 for p in plan)
    assert {(p.num_kv_heads, p.head_dim, p.sliding_window, p.k_eq_v) for p in plan if p.is_sliding} == {(8, 256, 1024, False)}
    assert {(p.num_kv_heads, p.head_dim, p.k_eq_v) for p in plan if not p.is_sliding} == {(2, 512, True)}


def test_31b_plan():
    plan = plan_of("31b")
    assert len(plan) == 60 and sum(not p.is_sliding for p in plan) == 10
    assert {(p.num_heads, p.num_kv_heads, p.head_dim) for p in plan if p.is_sliding} == {(32, 16, 256)}
    assert {(p.num_kv_heads, p.head_dim, p.k_eq_v) for p in plan if not p.is_sliding} == {(4, 512, True)}
    assert {p.mlp_width for p in plan} == {21504}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_save_pretrained_dialect_gives_the_same_plan(tmp_path, name):
    """A config written by transformers' save_pretrained (per_layer_config, no global_head_dim)."""
    transformers = pytest.importorskip("transformers")
    release = preset_config(name)
    transformers.Gemma4Config(**release).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved["text_config"] and "global_head_dim" not in saved["text_config"]
    assert build_plan(ModelConfig.from_file(tmp_path / "config.json").text) == plan_of(name)


def test_per_layer_config_keys_may_be_zero_padded():
    base = {k: v for k, v in preset_config("e2b")["text_config"].items() if k != "global_head_dim"}
    padded = {**base, "per_layer_config": {f"{i:02d}": {"head_dim": 512} for i in range(4, 35, 5)}}
    assert build_plan(TextConfig.from_dict(padded)) == plan_of("e2b")


def test_global_kv_heads_apply_only_with_k_eq_v():
    """As in the reference: num_global_key_value_heads is ignored unless attention_k_eq_v."""
    text = {**preset_config("e4b")["text_config"], "num_global_key_value_heads": 1}
    assert {p.num_kv_heads for p in build_plan(TextConfig.from_dict(text))} == {2}


def test_bad_per_layer_override_is_refused():
    text = {**preset_config("e2b")["text_config"], "per_layer_config": {"4": {"intermediate_size": 8}}}
    with pytest.raises(ConfigError, match=r"per_layer_config\['4'\] overrides 'intermediate_size'"):
        TextConfig.from_dict(text)
