"""The memory planner: its KV bytes equal the cache's own accounting, and the architecture's claims."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gemma4
from gemma4.config import ModelConfig
from gemma4.plan import build_plan
from gemma4.planner import ALL_ON, EACH_OFF, Savings, kv_bytes_by_type, plan_memory, tokenizer_bytes
from gemma4.runtime.generate import prefill
from gemma4.runtime.kv_cache import ModelCache
from gemma4.runtime.tokenizer import tokenizer_counts
from gemma4.weights.presets import preset_config


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b", "tiny-31b", "tiny-gemma3"])
@pytest.mark.parametrize("context", [3, 8, 40, 300])
def test_planned_kv_bytes_equal_the_cache(checkpoints, preset, context):
    lm = gemma4.load(checkpoints(preset, torch.bfloat16), progress=False).lm
    ids = torch.randint(0, 262_144, (2, context), generator=torch.Generator().manual_seed(0))
    cache = ModelCache(lm.plan, 2, context, torch.bfloat16)
    prefill(lm, cache, ids, torch.arange(context).expand(2, -1), 64)
    planned = plan_memory(ModelConfig.from_dict(preset_config(preset)), context, dtype="bf16", batch=2)["kv_cache"]
    assert planned == cache.nbytes_by_type()


@pytest.mark.parametrize("preset,kv_dtype", [("tiny-e2b", "bf16"), ("tiny-31b", "bf16"), ("tiny-e2b", "int8"), ("tiny-31b", "int8")])
def test_serving_plan_bounds_a_session_with_its_snapshots(checkpoints, preset, kv_dtype):
    """`gemma4 serve` plans each slot at a full context with MAX_MARKS ring snapshots: a session
    filled to its context with every mark snapshotted holds exactly that (int8 K/V: codes and scales)."""
    from gemma4.planner import serving_kv_bytes
    from gemma4.runtime.generate import MAX_MARKS, Session

    lm = gemma4.load(checkpoints(preset, torch.bfloat16), progress=False, kv_dtype=kv_dtype).lm
    context = 512
    session = Session(lm, context, prefill_chunk=100)
    prompt = torch.randint(0, 262_144, (context - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    session.start_prompt(prompt, marks=[50, 200, 300, 400])
    assert len(session.snapshots) == MAX_MARKS
    assert session.nbytes() == sum(serving_kv_bytes(lm.plan, context, 1, kv_dtype, MAX_MARKS).values())


def test_e2b_kv_claim_at_8k():
    """'Sharing + sliding windows + 8:1 GQA cut the cache by ~83 % at 8K': against the same model
    caching every layer in full (same KV heads) we measure 83.9 %; dropping GQA too, 98.0 %."""
    plan = build_plan(ModelConfig.from_dict(preset_config("e2b")).text)
    ours = sum(kv_bytes_by_type(plan, 8192, 1, "bf16").values())
    full = sum(kv_bytes_by_type(plan, 8192, 1, "bf16", Savings(sliding_bound=False, kv_sharing=False)).values())
    assert round(100 * (1 - ours / full), 1) == 83.9


def test_each_saving_costs_memory_when_switched_off():
    config = ModelConfig.from_dict(preset_config("e2b"))
    base = plan_memory(config, 32_768)["total_resident"]
    for name, savings in EACH_OFF.items():
        off = plan_memory(config, 32_768, savings=savings)["total_resident"]
        assert off >= base, name
        if name != "no K=V":  # E2B has no K=V layers
            assert off > base, name
    moe = ModelConfig.from_dict(preset_config("26b-a4b"))
    assert plan_memory(moe, 32_768, savings=EACH_OFF["no K=V"])["total_resident"] > plan_memory(moe, 32_768)["total_resident"]
    assert ALL_ON == Savings()


def test_plan_command_sweep():
    out = subprocess.run([sys.executable, "-m", "gemma4.interfaces.cli", "plan", "e2b", "--sweep", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert [p["context"] for p in report["plans"]] == [2048, 8192, 32768, 131072]  # E2B stops at 128K
    assert report["plans"][0]["kv_cache"]["sliding_attention"] == report["plans"][-1]["kv_cache"]["sliding_attention"]
    assert set(report["savings"]) == {"as designed", *EACH_OFF}


@pytest.mark.parametrize("preset", ["tiny-e2b", "tiny-26b-a4b", "tiny-gemma3"])
@pytest.mark.parametrize("quant,group", [("bf16", 0), ("int8", 0), ("int4", 0), ("int4", 32)])
def test_planned_packed_weights_equal_the_loaded_model(checkpoints, preset, quant, group):
    """With --quant, the planned weight bytes are the packed model's own, and K/V is cached in fp16."""
    model = gemma4.load(checkpoints(preset, torch.bfloat16), quant=quant, group=group, progress=False)
    held = sum(t.nbytes for t in [*model.lm.parameters(), *model.lm.buffers()])
    plan = plan_memory(ModelConfig.from_dict(preset_config(preset)), 40, quant=quant, group=group)
    planned = sum(plan["weights"].values()) + plan["ple_table"]["bytes"]
    assert planned == held
    model.generate([5, 6, 7], max_new_tokens=2, temperature=0)
    assert plan["kv_cache"] == plan_memory(ModelConfig.from_dict(preset_config(preset)), 40, kv_dtype="fp16")["kv_cache"]
    assert model.lm.kv_dtype == torch.float16 and plan["kv_dtype"] == "fp16"


def test_a_saved_quantized_checkpoint_is_planned_as_saved(checkpoints, tmp_path):
    """`gemma4 plan` on a `gemma4 quantize` folder counts its packed PLE table too, byte for byte."""
    from gemma4.weights.quantized import save_quantized

    target = save_quantized(checkpoints("tiny-e2b", torch.bfloat16), tmp_path / "int4", "int4", progress=False)
    lm = gemma4.load(target, progress=False).lm
    held = sum(t.nbytes for t in [*lm.parameters(), *lm.buffers()])
    out = subprocess.run([sys.executable, "-m", "gemma4.interfaces.cli", "plan", str(target), "--context", "40", "--json"], capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)["plans"][0]
    assert plan["quant"] == "int4" and sum(plan["weights"].values()) + plan["ple_table"]["bytes"] == held


TOKENIZER_RESIDENT = """
import gc, json, sys
def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
import gemma4
from gemma4.runtime import heap
from gemma4.runtime.tokenizer import Tokenizer
before = resident()
tokenizer = Tokenizer.from_folder(sys.argv[1])
gc.collect()
heap.release_free()  # as a load ends (runtime.engine.Model)
print(resident() - before)
"""


def test_planned_tokenizer_bytes_are_what_loading_it_holds(checkpoints):
    """The plan counts the tokenizer from its own vocabulary and merges: loaded in a fresh process, it holds
    within 15 % of that (the synthetic checkpoints' full 262,144-entry vocabulary: ~0.11 GB)."""
    folder = checkpoints("tiny-e2b")
    tokens, merges = tokenizer_counts(folder)
    assert tokens == 262_144
    out = subprocess.run([sys.executable, "-c", TOKENIZER_RESIDENT, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    held, planned = int(out.stdout), tokenizer_bytes(tokens, merges)
    assert abs(held - planned) <= 0.15 * planned, (held, planned)
    assert tokenizer_counts(folder / "no such folder") is None
