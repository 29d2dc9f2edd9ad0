"""Tokenizers as checkpoints ship them, and the generate() API a user calls."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import gemma4
from gemma4.errors import Gemma4Error
from gemma4.runtime.tokenizer import MEDIA_TOKENS, SPECIAL_TOKENS, StreamDecoder, Tokenizer

TEXT = "Hello, world! Ünïcödé 你好 🙂 tabs\tand\nnewlines"


@pytest.fixture(scope="module")
def model(checkpoints):
    return gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, progress=False)


def test_special_tokens_sit_at_their_real_ids(model):
    tokenizer = model.tokenizer
    assert len(tokenizer.vocab) == 262_144
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.encode(token) == [token_id], token
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
    assert model.stop_ids == {1, 106, 50}  # from generation_config.json


def test_round_trip_and_streaming_decode(model):
    tokenizer = model.tokenizer
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == TEXT and not any("\ufffd" in d for d in deltas)


def test_exactly_one_bos_on_every_path(model):
    tokenizer = model.tokenizer
    ids = tokenizer.encode("The capital")
    assert tokenizer.prompt_ids("The capital") == tokenizer.prompt_ids("<bos>The capital") == [2, *ids]
    greedy = dict(max_new_tokens=5, temperature=0)
    expected = model.generate([2, *ids], **greedy)
    assert model.generate(ids, **greedy) == model.generate([2, 2, *ids], **greedy) == expected
    assert model.generate("The capital", **greedy) == tokenizer.decode(expected)
    # chat: the template writes <bos> and tokenisation must not add a second one
    model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1, temperature=0)
    assert model._session.tokens[:2] == [2, 105]


def test_stream_equals_whole_and_stop_strings_end_it(model):
    greedy = dict(max_new_tokens=12, temperature=0)
    whole = model.generate("Once", **greedy)
    assert "".join(model.generate("Once", stream=True, **greedy)) == whole
    stop = whole[4:7]
    cut = model.generate("Once", stop=[stop], **greedy)
    assert cut == whole[: whole.index(stop)]
    assert model.stats.generated_tokens < 12  # generation itself ended at the stop string


def test_batch_of_different_lengths_equals_one_by_one(model):
    prompts = ["Hi", "A much longer prompt than the other one, spanning more than a window"]
    greedy = dict(max_new_tokens=6, temperature=0)
    assert model.generate(prompts, **greedy) == [model.generate(p, **greedy) for p in prompts]


def test_sampling_defaults_come_from_the_checkpoint(model):
    params = model.sampling()
    assert (params.temperature, params.top_k, params.top_p) == (1.0, 64, 0.95)
    assert model.sampling(temperature=0).temperature == 0
    assert model.banned_ids == {SPECIAL_TOKENS[t] for t in MEDIA_TOKENS}
    seeded = dict(max_new_tokens=6, seed=3)
    assert model.generate("Hi", **seeded) == model.generate("Hi", **seeded)


def test_prompt_longer_than_context_is_refused_up_front(checkpoints):
    small = gemma4.load(checkpoints("tiny-e2b"), dtype=torch.float32, context=16, progress=False)
    with pytest.raises(Gemma4Error, match=r"the prompt is \d+ tokens but the context is 16"):
        small.generate("word " * 40)
    with pytest.raises(Gemma4Error, match="the context is 16"):
        small.chat([{"role": "user", "content": "word " * 40}])


def test_checkpoint_without_tokenizer_still_gives_logits(checkpoints, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoints("tiny-31b"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    model = gemma4.load(folder, dtype=torch.float32, progress=False)
    assert model(torch.tensor([[2, 3, 4]])).shape == (1, 3, 262_144)
    assert len(model.generate([2, 3, 4], max_new_tokens=3, temperature=0)) == 3
    with pytest.raises(Gemma4Error, match="no tokenizer.json or tokenizer.model: pass token ids"):
        model.generate("text")


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "models run on the hardware people own"] * 20
    specials = ["<|turn>", "<turn|>", "<|channel>", "<channel|>"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300, byte_fallback=True, minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=specials, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
    tokenizer = Tokenizer.from_folder(tmp_path)
    assert tokenizer.kind == "sentencepiece"
    text = "<|turn>user\nhello 🙂 world<turn|>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.token_id("<|turn>") and tokenizer.token_id("<turn|>") == ids[-1]
    assert tokenizer.decode(ids) == text
    assert tokenizer.prompt_ids("<bos>hello")[:2] == [2, *tokenizer.encode("hello")[:1]]


def test_corrupt_tokenizer_is_reported(checkpoints, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoints("tiny-31b"), folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(Gemma4Error, match=r"tokenizer\.json: cannot be read"):
        gemma4.load(folder, progress=False)
