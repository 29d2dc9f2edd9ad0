"""Our logits against `transformers` 5.23 `models/gemma4`, on the same files from disk.

The reference runs in float64 as ground truth; our fp32 error must be no larger than a few
times the reference's own fp32 error."""

from __future__ import annotations

import pytest
import torch

import gemma4

transformers = pytest.importorskip("transformers")

from conftest import TINY_PRESETS, reference_class  # noqa: E402


def reference(path, dtype):
    model, info = reference_class(path).from_pretrained(
        path, dtype=dtype, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    # The names are proven only if the reference found every tensor where it looked.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def two_sequences(length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 262_144, (2, length), generator=generator)  # two different rows


def assert_parity(path, ids, dtype=torch.float32):
    """Our error in `dtype` is at most 3x the reference's own error in `dtype`."""
    with torch.no_grad():
        truth = reference(path, torch.float64)(input_ids=ids).logits
        same_dtype = reference(path, dtype)(input_ids=ids).logits.double()
    ours = gemma4.load(path, dtype=dtype, progress=False)(ids)
    assert ours.shape == truth.shape and ours.dtype == dtype
    our_error = (ours.double() - truth).abs().max().item()
    ref_error = (same_dtype - truth).abs().max().item()
    assert our_error <= max(3 * ref_error, 1e-5), f"ours {our_error:.2e} vs reference {dtype} {ref_error:.2e}"
    # Not a vacuous comparison: the logits are spread out and each row differs.
    assert truth.std() > 0.5 and not torch.allclose(truth[0], truth[1])


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_logits_match_reference_past_the_window(checkpoints, preset):
    path = checkpoints(preset)
    window = gemma4.load(path, progress=False).config.sliding_window
    assert_parity(path, two_sequences(4 * window + 5))


def test_multimodal_checkpoint_decoder_matches_reference(checkpoints):
    assert_parity(checkpoints("tiny-e2b-mm"), two_sequences(21))


def test_bf16_checkpoint_in_bf16_matches_reference_bf16(checkpoints):
    """bf16 storage and compute: our round-off is the reference's round-off."""
    assert_parity(checkpoints("tiny-e2b", torch.bfloat16), two_sequences(30), dtype=torch.bfloat16)
