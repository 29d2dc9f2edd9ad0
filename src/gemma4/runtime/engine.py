"""A loaded Gemma 4 checkpoint as a user sees it: logits, text generation and chat."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from torch import Tensor

from ..errors import Gemma4Error
from ..config import ModelConfig
from ..media.image import DEFAULT_BUDGET
from ..media.prompt import Media, build_prompt, expand, processor_outputs, split_media
from ..model import CausalLM
from ..model.multimodal import MediaEncoders, merge
from ..parallel.ranks import ALONE, Ranks
from ..parallel.sharding import WHOLE, Shard
from ..planner import kv_vector_bytes, widest_chunk_values
from ..quant.modules import set_fast_math
from . import heap, huge_pages
from .chat_format import render_chat
from .chat_parser import ChatResult, Event, OutputParser
from .generate import DEFAULT_PREFILL_CHUNK, Batch, Prompt, Session, sample_loop, turn_marks
from .sampling import SamplingParams
from .stop_strings import StopStrings
from .tokenizer import MEDIA_TOKENS, StreamDecoder, Tokenizer


END_OF_TURN_ID = 106  # `<turn|>` in Gemma 4, `<end_of_turn>` in Gemma 3: a stop token for both
GGUF_MEDIA_HINT = (" (a GGUF file holds the text model; llama.cpp keeps the encoders in a separate mmproj file, which gemma4"
                   " does not load yet: use the Hugging Face checkpoint folder for images and audio)")


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens already in the cache (chat sessions)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds and self.generated_tokens > 1 else 0.0


KV_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}


class Model:
    """Load with `gemma4.load(path)`. `model(input_ids)` gives logits; `generate` and `chat` give text."""

    def __init__(
        self,
        lm: CausalLM,
        tokenizer: Tokenizer | None,
        generation_config: Mapping[str, Any],
        chat_template: str | None,
        context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        progress: bool = False,
    ):
        self.lm = lm
        self.ranks = ALONE
        self.fast_math = False
        self.configure()
        self.tokenizer = tokenizer
        self.generation_config = dict(generation_config)
        self.chat_template = chat_template
        self.context = min(context or lm.config.max_position_embeddings, lm.config.max_position_embeddings)
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.prefill_chunk = prefill_chunk
        heap.reuse_blocks_up_to(4 * widest_chunk_values(lm.plan, lm.config, prefill_chunk))  # fp32: the widest a chunk's activations are
        huge_pages.gather_streamed_weights(lm, progress)
        heap.release_free()  # the model and tokenizer are loaded: what loading them dropped goes back
        self.chat_format: str | None = "gemma4"  # None: the model only continues text (no known chat format)
        self.stats = Stats()
        self._session: Session | None = None
        self.checkpoint: Path | None = None  # where the encoders are, if the checkpoint has any
        self.encoder_kinds: set[str] = set()  # "image", "video", "audio": what its encoders read
        self._encoders: MediaEncoders | None = None
        self._encoders_loading = threading.Lock()
        self.media_costs: list[str] = []  # what the last chat's images, video and audio cost, in words

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        progress: bool = True,
        quant: str | None = None,
        group: int = 0,
        ranks: Ranks = ALONE,
    ) -> Model:
        """ranks: the ranks the model runs on, this process's part loaded (parallel/)."""
        from ..weights import load_model

        folder = Path(path)
        if folder.is_file() and folder.suffix == ".gguf":
            model = cls.from_gguf(folder, dtype, context, prefill_chunk, progress, quant, group, ranks.shard)
            model.run_on(ranks)
            return model
        lm = load_model(folder, dtype=dtype or torch.bfloat16, progress=progress, quant=quant, group=group, shard=ranks.shard)
        has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
        tokenizer = Tokenizer.from_folder(folder) if has_tokenizer else None
        model = cls(lm, tokenizer, _read_json(folder / "generation_config.json"), _chat_template(folder), context, prefill_chunk, progress)
        config = ModelConfig.from_file(folder / "config.json")
        model.checkpoint = folder
        model.encoder_kinds = ({"image", "video"} if config.vision else set()) | ({"audio"} if config.audio else set())
        model.run_on(ranks)
        return model

    def run_on(self, ranks: Ranks) -> None:
        """Sum this rank's partial outputs over the others, and sample as they do."""
        self.ranks = ranks
        if ranks.size > 1:
            ranks.attach(self.lm)
            ranks.seed_alike()

    @classmethod
    def from_gguf(
        cls,
        path: Path,
        dtype: torch.dtype | str | None = None,
        context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        progress: bool = True,
        quant: str | None = None,
        group: int = 0,
        shard: Shard = WHOLE,
    ) -> Model:
        """A llama.cpp / Ollama GGUF file: config, weights (kept in the file's types unless `dtype` or
        `quant` asks otherwise), tokenizer, template."""
        from ..weights.checkpoint import resolve_dtype
        from ..weights.gguf_file import gguf_tokenizer, load_gguf_model

        lm, checkpoint = load_gguf_model(path, resolve_dtype(dtype) if dtype else None, progress, quant, group, shard)
        template = checkpoint.field("tokenizer.chat_template")
        eos = checkpoint.field("tokenizer.ggml.eos_token_id", 1)
        generation = {"eos_token_id": sorted({eos, END_OF_TURN_ID})}
        model = cls(lm, gguf_tokenizer(checkpoint), generation, template, context, prefill_chunk, progress)
        if template is None and checkpoint.architecture != "gemma4":
            model.chat_format = None  # no template and not Gemma 4's format: plain text only
        return model

    def configure(self, kv_dtype: torch.dtype | str | None = None, fast_math: bool = False) -> None:
        """The K/V cache's dtype: "bf16", "fp16", "fp32" or "int8" (a scale per head and position); None:
        fp16 beside packed weights, whose activations are fp32 (half the bytes, and next-token KL ~1e-5
        against fp32 K/V where bf16's is ~3e-4), else the activations' dtype. `fast_math`: packed
        matmuls round activations to int8 only, as llama.cpp does (faster, and measurably not the same
        model: see benchmarks/quality.py)."""
        from ..weights.checkpoint import resolve_dtype

        if kv_dtype in ("int8", torch.int8):
            self.lm.kv_dtype = torch.int8
        elif kv_dtype is not None:
            self.lm.kv_dtype = resolve_dtype(kv_dtype)
        elif self.lm.dtype == torch.float32 and _is_packed(self.lm):
            self.lm.kv_dtype = torch.float16
        else:
            self.lm.kv_dtype = None
        self.fast_math = fast_math
        set_fast_math(self.lm, fast_math)
        self._session = None

    @property
    def kv_dtype(self) -> str:
        """The K/V cache's dtype, by its planner name."""
        return KV_DTYPE_NAMES[self.lm.kv_dtype or self.lm.dtype]

    # --- the model itself ---------------------------------------------------------------
    @property
    def config(self):  # noqa: ANN201 - a TextConfig
        return self.lm.config

    @property
    def plan(self):  # noqa: ANN201 - a tuple of LayerPlan
        return self.lm.plan

    def __call__(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_position_ids: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_position_ids: Tensor | None = None,
        input_features: Tensor | None = None,
        input_features_mask: Tensor | None = None,
    ) -> Tensor:
        """input_ids: LongTensor [batch, seq] -> soft-capped logits [batch, seq, vocab].

        With media, the tensors `Gemma4Processor` makes (and `process` returns), under its names:
        pixel_values [images, patches, 768] with image_position_ids [images, patches, 2], the same
        for video frames, input_features [clips, frames, 128] with input_features_mask [clips, frames]."""
        soft = {}
        if pixel_values is not None:
            soft[self._token("<|image|>")] = self._require_encoders("image").images(pixel_values, image_position_ids)
        if pixel_values_videos is not None:
            soft[self._token("<|video|>")] = self._require_encoders("video").images(pixel_values_videos, video_position_ids)
        if input_features is not None:
            soft[self._token("<|audio|>")] = self._require_encoders("audio").audio(input_features, input_features_mask)
        if not soft:
            return self.lm(input_ids)
        return self.lm(input_ids, media=merge(input_ids, soft, self.config.hidden_size, self._vision_ids()))

    # --- media ---------------------------------------------------------------------------
    def _token(self, name: str) -> int:
        token = self._require_tokenizer().token_id(name)
        if token is None:
            raise Gemma4Error(f"this model's vocabulary has no {name} token: it takes no such media")
        return token

    def _vision_ids(self) -> list[int] | None:
        """Image and video placeholders, whose runs attend both ways on the server models."""
        return [self._token("<|image|>"), self._token("<|video|>")] if self.config.use_bidirectional_attention == "vision" else None

    def _require_encoders(self, kind: str) -> MediaEncoders:
        """The encoders, loaded on first use (a text-only request never loads them)."""
        if kind not in self.encoder_kinds:
            reads = ", ".join(sorted(self.encoder_kinds | {"text"}))
            raise Gemma4Error(f"this model has no encoder for {kind}: it reads {reads}")
        with self._encoders_loading:  # a server's requests may ask for them at once
            if self._encoders is None:
                from ..weights.checkpoint import load_encoders

                # fp32 with fp32 activations, else bf16; never below, whatever the text weights: quantized encoders lose what they hear and see.
                self._encoders = load_encoders(self.checkpoint, torch.float32 if self.lm.dtype == torch.float32 else torch.bfloat16)  # type: ignore[arg-type]
        return self._encoders

    def media_prompt(self, text: str, media: list[Media]) -> Prompt:
        """Rendered prompt text and its media -> the prompt to prefill, placeholders expanded."""
        encoders = None
        for item in media:  # each kind checked; loaded once
            encoders = self._require_encoders(item.kind)
        return build_prompt(text, media, self._require_tokenizer(), encoders, self.config.hidden_size, self._vision_ids() is not None)

    # --- generation ---------------------------------------------------------------------
    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    def sampling(self, **overrides: Any) -> SamplingParams:
        """Sampling options: the checkpoint's generation_config.json, then the caller's."""
        defaults: dict[str, Any] = {}
        if self.generation_config.get("do_sample"):
            defaults = {k: self.generation_config[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in self.generation_config}
            defaults.setdefault("temperature", 1.0)
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**defaults)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise Gemma4Error("this checkpoint has no tokenizer.json or tokenizer.model: pass token ids instead of text")
        return self.tokenizer

    @property
    def banned_ids(self) -> set[int]:
        """Tokens never sampled for text: media placeholders and brackets."""
        return self.tokenizer.ids_of(MEDIA_TOKENS) if self.tokenizer else set()

    @property
    def chat_stop_ids(self) -> set[int]:
        """A chat answer also ends where the model opens the tool response it waits for."""
        return self.stop_ids | (self.tokenizer.ids_of(["<|tool_response>"]) if self.tokenizer else set())

    def one_bos(self, ids: Sequence[int]) -> list[int]:
        bos = self.tokenizer.bos_id if self.tokenizer else self.config.bos_token_id
        ids = list(ids)
        while ids and ids[0] == bos:
            ids = ids[1:]
        return [bos, *ids]

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 256,
        *,
        stream: bool = False,
        stop: Sequence[str] = (),
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ) -> Any:
        """Continue a prompt.

        Args:
            prompt: text (returns the generated text), token ids (returns the new ids), or a list
                of either (a batch of any lengths; returns a list).
            stream: yield text deltas (or ids) as they come instead; single prompts only.
            stop: strings that end the generation (not included in the output).
            temperature, top_k, top_p, min_p, repetition_penalty, seed: sampling; temperature 0 is greedy.
        """
        params = self.sampling(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed
        )
        batch = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts = list(prompt) if batch else [prompt]  # type: ignore[list-item]
        as_text = isinstance(prompts[0], str)
        ids = [self._require_tokenizer().prompt_ids(p) if as_text else self.one_bos(p) for p in prompts]  # type: ignore[arg-type]
        if stream and batch:
            raise ValueError("stream=True takes a single prompt")
        tokens = self._run(Batch(self.lm, ids, self.context, self.prefill_chunk, self.config.pad_token_id or 0), max_new_tokens, params)
        if stream or not batch:  # one prompt: stop strings end the generation itself, not just the text
            rows = (int(t[0]) for t in tokens)
            deltas = _text_stream(rows, self.tokenizer, self.stop_ids, stop) if as_text else _id_stream(rows, self.stop_ids)
            if stream:
                return deltas
            return "".join(deltas) if as_text else list(deltas)
        outputs: list[list[int]] = [[] for _ in ids]
        for step in tokens:
            for row, token in enumerate(step.tolist()):
                if token >= 0 and token not in self.stop_ids:
                    outputs[row].append(token)
        if as_text:
            return ["".join(_text_stream(iter(o), self.tokenizer, self.stop_ids, stop)) for o in outputs]
        return outputs

    def _run(self, feeder: Batch | Session, max_new_tokens: int, params: SamplingParams, prompt: Prompt | None = None) -> Iterator[Tensor]:
        """Time prefill and decode around `sample_loop`."""
        started = time.perf_counter()
        if isinstance(feeder, Session):
            marks = turn_marks(prompt.ids, self._require_tokenizer().token_id("<|turn>"))  # type: ignore[union-attr]
            logits, history = feeder.start_prompt(prompt, marks)  # type: ignore[arg-type]
        else:
            logits, history = feeder.start()
        self.stats = Stats(prompt_tokens=history.shape[1], reused_tokens=getattr(feeder, "reused", 0))
        self.stats.prefill_seconds = time.perf_counter() - started
        first = time.perf_counter()
        stops = self.chat_stop_ids if isinstance(feeder, Session) else self.stop_ids
        for token in sample_loop(feeder, logits, history, max_new_tokens, params, stops, self.banned_ids):
            self.stats.generated_tokens += 1
            self.stats.decode_seconds = time.perf_counter() - first
            yield token

    # --- chat ---------------------------------------------------------------------------
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 1024,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        stream: bool = False,
        image_tokens: int = DEFAULT_BUDGET,
        **sampling: Any,
    ) -> ChatResult | Iterator[Event]:
        """Answer OpenAI-style messages, which may carry images, video and audio (see `chat_prompt`).
        Returns a ChatResult (content, reasoning, tool_calls), or with stream=True an iterator of
        Events. The conversation's cache is kept: calling again with the history extended prefills
        only the new tokens."""
        prompt = self.chat_prompt(messages, tools, thinking, image_tokens)
        self.media_costs = [description for _, _, description in prompt.costs]
        if self._session is None:
            self._session = Session(self.lm, self.context, self.prefill_chunk)
        events = self._chat_events(self._run(self._session, max_new_tokens, self.sampling(**sampling), prompt))
        if stream:
            return events
        result = ChatResult()
        for event in events:
            result.add(event)
        return result

    def chat_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        thinking: bool = False,
        image_tokens: int = DEFAULT_BUDGET,
    ) -> Prompt:
        """OpenAI-style messages (with image, video and audio parts, where the model reads them) ->
        the prompt, in the Gemma 4 format or the checkpoint's template. `image_tokens`: each
        image's soft-token budget (70, 140, 280, 560, 1120)."""
        return self.media_prompt(*self._render(messages, tools, thinking, image_tokens))

    def process(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, thinking: bool = False,
        image_tokens: int = DEFAULT_BUDGET,
    ) -> dict[str, Tensor]:
        """The tensors `Gemma4Processor` returns for these messages (input_ids, attention_mask,
        mm_token_type_ids, pixel_values, image_position_ids, ..., input_features_mask): what
        `model(**tensors)` takes, without mm_token_type_ids and attention_mask."""
        text, media = self._render(messages, tools, thinking, image_tokens)
        return processor_outputs(self._require_tokenizer().prompt_ids(expand(text, media)), media, self._require_tokenizer())

    def _render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, thinking: bool, image_tokens: int
    ) -> tuple[str, list[Media]]:
        """Messages -> (the prompt text with one placeholder per media item, the media, prepared)."""
        self._require_tokenizer()
        if self.chat_format is None and self.chat_template is None:
            raise Gemma4Error("this model has no chat template: use generate() (or `gemma4 run --raw`) to continue text")
        hint = GGUF_MEDIA_HINT if self.checkpoint is None and self.chat_format == "gemma4" else ""
        messages, media = split_media(messages, self.encoder_kinds, image_tokens, hint)
        try:
            return render_chat(messages, tools, thinking, self.chat_template), media
        except ValueError as e:
            raise Gemma4Error(f"bad messages: {e}") from None
        except jinja2.TemplateError as e:  # a checkpoint's own template that cannot take these messages
            raise Gemma4Error(f"the chat template cannot render these messages: {e}") from None

    def _chat_events(self, tokens: Iterator[Tensor]) -> Iterator[Event]:
        parser = OutputParser(self._require_tokenizer())
        for step in tokens:
            yield from parser.push(int(step[0]))
        yield from parser.finish()

    def reset_chat(self) -> None:
        self._session = None

    # --- diagnosis ----------------------------------------------------------------------
    def describe(self) -> list[str]:
        """What users need to diagnose 'slow' or 'wrong': context, KV, PLE placement, attention paths."""
        from .kv_cache import global_capacity

        lines = [f"context: {self.context} tokens (model maximum {self.config.max_position_embeddings})"]
        if self.ranks.size > 1:
            lines.append(f"ranks: {self.ranks.size}, this one {self.ranks.rank}; heads, MLP widths and experts split over them (the figures"
                         f" below are this rank's); {self.ranks.reductions} all-reduces of {self.ranks.reduced_bytes:,} B so far")
        table = getattr(self.lm.model, "embed_tokens_per_layer", None)
        if table is not None:
            lines.append(f"per-layer embeddings: {_table_placement(table)}")
        session = self._session
        held = session.cache.nbytes_by_type() if session else {}
        for kind in ("sliding_attention", "full_attention"):
            plans = [p for p in self.plan if p.attention_type == kind]
            if not plans:
                continue
            owners = [p for p in plans if p.owns_kv]
            p = plans[0]
            per_token = sum(o.num_kv_heads * (1 if o.k_eq_v else 2) * kv_vector_bytes(o.head_dim, self.kv_dtype) for o in owners)
            bound = f"ring of {p.sliding_window} positions" if p.sliding_window else f"up to {global_capacity(self.context, self.context)} positions"
            lines.append(
                f"{kind}: {len(plans)} layers ({len(plans) - len(owners)} KV-shared), head_dim {p.head_dim}, "
                f"{p.num_heads}q/{p.num_kv_heads}kv heads{', K=V' if p.k_eq_v else ''}; KV {per_token} B/token, {bound}; "
                f"held now {held.get(kind, 0):,} B; attention: torch SDPA with a position mask"
            )
        return lines


def _is_packed(lm: torch.nn.Module) -> bool:
    from ..quant.modules import PackedModule

    return any(isinstance(m, PackedModule) for m in lm.modules())


def _table_placement(table: torch.nn.Module) -> str:
    """Where the PLE table lives: rows are read per token, so it need not be in RAM."""
    if hasattr(table, "blocks"):  # a quantized GGUF table: rows repacked as read
        return f"{table.blocks.nbytes:,} B of {table.type_name} blocks in the GGUF file (rows read per token)"
    weight = table.weight
    where = "in the checkpoint file (rows read per token)" if table.stored_rows else "memory-mapped" if _is_mapped(weight) else "in RAM"
    packing = f"packed {table.packed('weight').kind}" if hasattr(table, "packed") else str(weight.dtype)
    return f"{weight.nbytes:,} B, {packing}, {where}"


def _text_stream(tokens: Iterator[int], tokenizer: Tokenizer | None, stop_ids: set[int], stop: Sequence[str]) -> Iterator[str]:
    """Token ids -> text deltas, ending at a stop id or a stop string (held back until decided)."""
    decoder = StreamDecoder(tokenizer, skip_special=True)  # type: ignore[arg-type]
    stops = StopStrings(stop)
    for token in tokens:
        if token in stop_ids:
            break
        if text := stops.push(decoder.push(token)):
            yield text
        if stops.hit:
            return
    if text := stops.push(decoder.flush()) + stops.flush():
        yield text


def _id_stream(tokens: Iterator[int], stop_ids: set[int]) -> Iterator[int]:
    for token in tokens:
        if token in stop_ids:
            return
        yield token


def _is_mapped(tensor: Tensor) -> bool:
    """True when the tensor is a view into a larger (memory-mapped file) storage."""
    return tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None
