"""A synthetic Gemma 4 tokenizer: a byte-fallback BPE like Gemma's (spaces as '▁'), trained on a
small built-in text, laid out over the full vocabulary with every special token at its real id.
Real weights would make it speak; with random ones it only has to be a valid, faithful format."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..runtime.chat_format import CHAT_TEMPLATE
from ..runtime.tokenizer import SPECIAL_TOKENS

BYTES_START = 256  # <0x00>..<0xFF> at 256..511
NEWLINE_ID = 107
LEARNED_START = 1024
LEARNED_SIZE = 4000

_CORPUS = [
    "A small model that runs on the hardware people own must be careful with memory: it keeps what it needs and "
    "reads the rest from disk. Sliding windows bound the cache; shared layers reuse what earlier layers stored.",
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "What is the capital of France? The capital of France is Paris. What is the weather in Tokyo?",
    "One two three four five six seven eight nine ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14",
    "def main():\n    print('hello')\n    return 0\n",
    "call get_weather city location temperature unit celsius response value thought answer model user system",
]


def _learned_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=LEARNED_SIZE, show_progress=False, special_tokens=[])
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return [p for p in pieces if p != "\n"], merges  # type: ignore[misc]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    vocab = dict(SPECIAL_TOKENS)
    vocab["\n"] = NEWLINE_ID
    vocab.update({f"<0x{b:02X}>": BYTES_START + b for b in range(256)})
    pieces, merges = _learned_pieces()
    next_id = LEARNED_START
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    taken = set(vocab.values())
    vocab.update({f"<unused{n}>": i for n, i in enumerate(i for i in range(vocab_size) if i not in taken)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=False))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    build_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "model_max_length": 1_000_000,
        "tokenizer_class": "GemmaTokenizer",
        # What Gemma4Processor asks its tokenizer for.
        "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
