"""The fused decode-step kernels (kernels/decode.c) compute what PyTorch's operators compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma4 import kernels
from gemma4.model.int8_kv import Int8Tensor, widen
from gemma4.model.layers import KeysOfValues, RMSNorm, Router, attend, normed_rotated
from gemma4.model.rope import KeyRotations, apply_rotary, rotary_tables
from gemma4.plan import RopePlan

pytestmark = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")


def torch_rms_norm(x, weight, eps, offset):
    normed = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return normed if weight is None else normed * (weight + offset)


@pytest.mark.parametrize("with_scale,offset", [(True, 0.0), (True, 1.0), (False, 0.0)])
def test_rms_norm_equals_the_operators(with_scale, offset):
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-6, with_scale=with_scale, offset=offset)
    if with_scale:
        norm.weight.data = torch.randn(256)
    x = torch.randn(3, 5, 256) * 4
    with torch.no_grad():
        torch.testing.assert_close(norm(x), torch_rms_norm(x, norm.weight, 1e-6, offset), atol=1e-6, rtol=1e-5)


def test_the_soft_cap_is_tanh_within_a_few_ulp():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(70_000) * s for s in (1e-3, 0.3, 5.0, 30.0, 1e3)] + [torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    exact = (x.double() / 30).tanh() * 30
    ours = kernels.softcap_(x.clone(), 30.0)  # (more than 2^18 values: the threaded path; the last few: the scalar tail)
    assert ((ours.double() - exact).abs() <= 4e-7 * exact.abs()).all()
    assert ours[-2:].tolist() == [30.0, -30.0]
    assert kernels.softcap_(torch.full((11,), float("nan")), 30.0).isnan().all()  # a vector of 8 and the tail


@pytest.mark.parametrize("heads,kv_heads,slots,dim", [(8, 1, 512, 256), (4, 2, 37, 32), (2, 2, 5, 16), (12, 1, 29, 64), (2, 2, 9, 64)])
def test_one_query_attention_equals_sdpa(heads, kv_heads, slots, dim):
    """Grouped queries, a masked cache slice of a larger buffer (as a global layer's), two sequences."""
    torch.manual_seed(1)
    buffer = torch.randn(2, 2, kv_heads, slots + 7, dim)
    key, value = buffer[0, :, :, :slots], buffer[1, :, :, :slots]
    q = torch.randn(2, 1, heads, dim)
    mask = torch.rand(2, 1, 1, slots) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), key, value, attn_mask=mask, scale=0.7, enable_gqa=True)
    fused = kernels.attend_one_query(q[:, 0].contiguous(), key, value, mask[:, 0, 0].contiguous(), 0.7)
    torch.testing.assert_close(fused, expected[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, key, value, mask, 0.7), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [8, 2])
@pytest.mark.parametrize("kind", ["bf16", "fp16", "int8"])
def test_one_query_attention_reads_a_narrow_cache_as_its_widened_values(kind, group):
    """16-bit caches and int8 codes with a scale per head and position (read in place from a larger
    buffer), 8 queries per KV head as the E2B's layers, 2 as the 26B-A4B's sliding ones."""
    torch.manual_seed(3)
    key, value = torch.randn(2, 2, 2, 48, 32).unbind(0)
    if kind == "int8":
        key, value = (Int8Tensor.quantize(t)[:, :, :40] for t in (key, value))
    else:
        key, value = (t.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[kind]))[:, :, :40] for t in (key, value))
    q = torch.randn(2, 1, 2 * group, 32)
    mask = torch.rand(2, 1, 1, 40) > 0.2
    wide = [widen(t, torch.float32) for t in (key, value)]
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), *wide, attn_mask=mask, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(attend(q, key, value, mask, 0.5), expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_scale", [True, False])
def test_norm_then_rotary_equals_the_operators(with_scale):
    """Per-token tables shared by all heads of the token, pairs (i, i + D/2), as apply_rotary."""
    torch.manual_seed(4)
    norm = RMSNorm(64, 1e-6, with_scale=with_scale)
    if with_scale:
        norm.weight.data = torch.randn(64)
    x, cos, sin = torch.randn(2, 3, 4, 64) * 3, torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = apply_rotary(torch_rms_norm(x, norm.weight, 1e-6, 0.0), cos, sin)
        torch.testing.assert_close(normed_rotated(norm, x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_one_token_without_a_cache_equals_sdpa():
    """A single-token forward pass (no cache): keys arrive as a transposed view, not cache rows."""
    torch.manual_seed(2)
    q, key, value = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 2, 32).transpose(1, 2), torch.randn(1, 1, 2, 32).transpose(1, 2)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), key, value, attn_mask=mask, scale=1.0, enable_gqa=True)
    torch.testing.assert_close(attend(q, key, value, mask, 1.0), expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


def test_the_compiled_router_picks_and_weighs_as_the_operators():
    """A decode step's rows route in one compiled call: the same experts, the same weights to round-off,
    as the router's PyTorch operators (which prompts take)."""
    torch.manual_seed(0)
    router = Router(2816, 128, 8, 1e-6)
    with torch.no_grad():
        router.scale.copy_(torch.rand(2816) + 0.5)
        router.proj.weight.copy_(torch.randn(128, 2816) * 0.05)
        router.per_expert_scale.copy_(torch.rand(128) + 0.5)
        x = torch.randn(Router.COMPILED_ROWS, 2816) * 3
        weights, ids = router(x)
        padded = torch.cat([x, x[:1]])  # more rows than the compiled router takes: PyTorch's operators
        expected_weights, expected_ids = (t[: len(x)] for t in router(padded))
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_k_eq_v_keys_rebuilt_inside_the_kernel_equal_the_rebuilt_keys(kind):
    """A K=V layer stores only its values; one query's kernel rebuilds each slot's key (value x k_norm's
    weight, rotated at its position: proportional RoPE, 12 of 32 pairs turning) as PyTorch's tables
    rotate them all for a prompt. Slots hold positions out of order; empty ones (-1) are masked."""
    torch.manual_seed(0)
    B, H, KV, S, D = 2, 8, 2, 40, 64
    rope = RopePlan(1e6, 12, D)
    q = torch.randn(B, 1, H, D)
    values = torch.randn(B, KV, S, D)
    values = Int8Tensor.quantize(values) if kind == "int8" else values.bfloat16()
    weight = torch.rand(D) + 0.5
    positions = torch.randperm(3000)[: B * S].view(B, S)
    positions[:, -3:] = -1
    mask = (torch.rand(B, 1, 1, S) > 0.3) & (positions >= 0)[:, None, None]
    mask[..., 0] = True
    keys = KeysOfValues(values, weight, positions, KeyRotations(rope, torch.float32).covering(positions))
    cos, sin = rotary_tables(rope, positions, torch.float32)
    rebuilt = apply_rotary(widen(values, torch.float32) * weight, cos[:, None], sin[:, None], head_axis=None)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), rebuilt, widen(values, torch.float32), attn_mask=mask,
                                              scale=1.0, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(attend(q, keys, values, mask, 1.0), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q.expand(B, 2, H, D), keys, values, mask.expand(B, 1, 2, S), 1.0), expected.expand(B, 2, H, D), atol=1e-5, rtol=1e-5)


def test_key_rotations_are_the_rotary_tables():
    """The kept rows of rotated pairs, grown as positions arrive, give rotary_tables' values bit for bit."""
    for rope, dtype in ((RopePlan(1e6, 64, 512), torch.float32), (RopePlan(1e4, 128, 256), torch.bfloat16), (RopePlan(1e6, 16, 64, 8.0), torch.float32)):
        rotations = KeyRotations(rope, dtype)
        for positions in (torch.arange(5)[None], torch.tensor([[3, 7, 2000, 0]]), torch.arange(3000).view(2, 1500)):
            cos, sin = rotations.covering(positions).tables(positions)
            expected = rotary_tables(rope, positions, dtype)
            assert torch.equal(cos, expected[0].float()) and torch.equal(sin, expected[1].float())
        assert len(rotations.cos) == 3072  # rows for the positions seen, in steps of KeyRotations.GROWTH
