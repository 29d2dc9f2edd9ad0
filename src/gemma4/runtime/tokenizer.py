"""The tokenizer a checkpoint ships: tokenizer.json through `tokenizers`, or tokenizer.model
through `sentencepiece`. Encoding never adds BOS by itself; `prompt_ids` adds exactly one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError

# Gemma 4's special tokens at their real ids.
SPECIAL_TOKENS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    '<|"|>': 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image>": 255_999,
    "<|audio>": 256_000,
    "<|image|>": 258_880,
    "<|audio|>": 258_881,
    "<image|>": 258_882,
    "<audio|>": 258_883,
    "<|video|>": 258_884,
}
# Soft-token placeholders and media brackets: never sampled when generating text.
MEDIA_TOKENS = ("<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>")


class Tokenizer:
    def __init__(self, backend: object, kind: str, vocab: dict[str, int], bos_id: int, eos_id: int, pad_id: int):
        self._backend = backend
        self.kind = kind  # "tokenizers" | "sentencepiece"
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._specials = sorted((t for t in SPECIAL_TOKENS if t in vocab), key=len, reverse=True)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # the library raises a bare Exception on malformed files
                raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
            vocab = backend.get_vocab(with_added_tokens=True)
            kind = "tokenizers"
        elif (folder / "tokenizer.model").is_file():
            import sentencepiece

            backend = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            vocab = {backend.id_to_piece(i): i for i in range(backend.get_piece_size())}
            kind = "sentencepiece"
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model; text needs the checkpoint's tokenizer")

        def special(name: str, default: str) -> int:
            token = config.get(name, default)
            token = token.get("content", default) if isinstance(token, dict) else token
            if token not in vocab:
                raise CheckpointError(f"{folder}: the tokenizer has no {name} {token!r}")
            return vocab[token]

        return cls(backend, kind, vocab, special("bos_token", "<bos>"), special("eos_token", "<eos>"), special("pad_token", "<pad>"))

    def to_json(self) -> str | None:
        """The tokenizer as tokenizer.json text (what grammar engines read); None for sentencepiece."""
        return self._backend.to_str() if self.kind == "tokenizers" else None  # type: ignore[attr-defined]

    def token_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def ids_of(self, tokens: Iterable[str]) -> set[int]:
        return {self.vocab[t] for t in tokens if t in self.vocab}

    def encode(self, text: str) -> list[int]:
        """Text (special tokens written out, like '<|turn>', become their ids) -> ids, no BOS added."""
        if self.kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
        ids: list[int] = []
        for piece in _split_specials(text, self._specials):
            if piece in self.vocab and piece in SPECIAL_TOKENS:
                ids.append(self.vocab[piece])
            elif piece:
                ids.extend(self._backend.encode(piece))  # type: ignore[attr-defined]
        return ids

    def prompt_ids(self, text: str) -> list[int]:
        """Ids for a prompt with exactly one BOS, whether or not `text` already starts with one."""
        ids = self.encode(text)
        while ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = list(ids)
        if self.kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special)  # type: ignore[attr-defined]
        pieces, run = [], []
        for i in ids:
            token = self.id_to_token.get(i, "")
            if token in SPECIAL_TOKENS:
                pieces.append(self._backend.decode(run))  # type: ignore[attr-defined]
                run = []
                if not skip_special:
                    pieces.append(token)
            else:
                run.append(i)
        pieces.append(self._backend.decode(run))  # type: ignore[attr-defined]
        return "".join(pieces)


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas. Holds text back while it ends in an
    incomplete UTF-8 sequence (byte-fallback tokens), and decodes only a short window each step."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids before this are settled
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] was emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda a, b: self.tokenizer.decode(self.ids[a:b], self.skip_special)  # noqa: E731
        emitted = decode(self.prefix_offset, self.read_offset)
        text = decode(self.prefix_offset, len(self.ids))
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""  # wait for the rest of the character
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]

    def flush(self) -> str:
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        text = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :]


def tokenizer_counts(folder: Path) -> tuple[int, int] | None:
    """(vocabulary entries, BPE merges) of a folder's tokenizer.json, for the memory planner; None without one."""
    try:
        model = json.loads((folder / "tokenizer.json").read_text()).get("model", {})
    except (OSError, ValueError):
        return None
    return len(model.get("vocab", ())), len(model.get("merges", ()))


def _split_specials(text: str, specials: list[str]) -> list[str]:
    pieces, start, i = [], 0, 0
    while i < len(text):
        match = next((s for s in specials if text.startswith(s, i)), None)
        if match:
            pieces += [text[start:i], match]
            i = start = i + len(match)
        else:
            i += 1
    pieces.append(text[start:])
    return pieces


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
