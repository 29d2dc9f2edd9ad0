"""Chat messages with images, video and audio -> what the engine prefills: the prompt with each
placeholder expanded to its soft tokens (as `Gemma4Processor` expands it), the encoders' soft
tokens in their place, and what identifies each token for the prefix cache (the same number of
placeholders with other pixels must not reuse a cache).

Parts are OpenAI's (`image_url` with a path, file:// or data: URL; `input_audio` with base64 WAV or
MP3; `video_url`) or native (`image` with a PIL image, array or path; `audio` with a path, 16 kHz
samples or (samples, rate); `video` with a path). An http(s) URL is refused: this engine works
offline and fetches nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import Gemma4Error
from ..model.multimodal import MediaEncoders, merge
from ..runtime.generate import Prompt
from ..runtime.tokenizer import Tokenizer
from .audio import Features, clips, load_audio, to_16k
from .image import DEFAULT_BUDGET, POOL, Patches, image_patches
from .video import DEFAULT_FRAME_BUDGET, read_video, timestamp, video_frames

PLACEHOLDER = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}
DETAIL_BUDGETS = {"low": 70, "high": 1120}  # OpenAI's image `detail`; "auto" keeps the default


@dataclass
class Media:
    """One image, video or audio recording, prepared for its encoder."""

    kind: str  # image | video | audio
    key: str  # a hash of its content
    patches: list[Patches] = field(default_factory=list)  # the image, or the video's frames
    seconds: list[float] = field(default_factory=list)  # the frames' times
    clips: list[Features] = field(default_factory=list)  # audio, in windows of at most 30 s

    @property
    def tokens(self) -> int:
        """Soft tokens it costs in the prompt."""
        return sum(p.tokens for p in self.patches) + sum(c.tokens for c in self.clips)

    def expansion(self) -> str:
        """The prompt text that stands for it (`Gemma4Processor.replace_*_token`)."""
        if self.kind == "image":
            return "<|image>" + "<|image|>" * self.tokens + "<image|>"
        if self.kind == "video":
            return " ".join(f"{timestamp(t)} <|image>" + "<|video|>" * p.tokens + "<image|>" for t, p in zip(self.seconds, self.patches))
        return "".join("<|audio>" + "<|audio|>" * c.tokens + "<audio|>" for c in self.clips)

    def describe(self) -> str:
        """What a user is told: the cost."""
        if self.kind == "image":
            height, width = self.patches[0].size
            return f"image {width}x{height}: {self.tokens} tokens"
        if self.kind == "video":
            return f"video, {len(self.patches)} frames: {self.tokens} tokens ({self.patches[0].tokens} a frame)"
        seconds = sum(c.seconds for c in self.clips)
        windows = f" in {len(self.clips)} windows of 30 s" if len(self.clips) > 1 else ""
        return f"audio {seconds:.1f} s{windows}: {self.tokens} tokens"


def _bytes_of(url: str) -> bytes | Path:
    if url.startswith("data:"):
        try:
            return base64.b64decode(url.split(",", 1)[1])
        except (IndexError, ValueError):
            raise Gemma4Error("a data: URL that is not base64 data") from None
    if url.startswith(("http://", "https://")):
        raise Gemma4Error(f"{url[:60]}: this engine fetches nothing from the network; pass a file path or a data: URL")
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise Gemma4Error(f"{path}: no such file")
    return path


def _image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    source = _bytes_of(str(value)) if isinstance(value, (str, Path)) else value
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
    except (OSError, ValueError) as e:
        raise Gemma4Error(f"not an image this engine reads: {e}") from None
    return image


def _audio(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)  # already 16 kHz mono
    if isinstance(value, tuple):
        return to_16k(value[0], value[1])
    return load_audio(_bytes_of(str(value)) if isinstance(value, (str, Path)) else value)


def _video(value: Any, budget: int) -> Media:
    source = _bytes_of(str(value))
    frames, rate = read_video(io.BytesIO(source) if isinstance(source, bytes) else source)  # type: ignore[arg-type]
    sampled = video_frames(frames, rate, budget)
    digest = hashlib.sha1(b"".join(p.pixels.numpy().tobytes() for p in sampled.frames)).hexdigest()
    return Media("video", digest, sampled.frames, sampled.seconds)


def read_part(part: Mapping[str, Any], image_budget: int = DEFAULT_BUDGET, frame_budget: int = DEFAULT_FRAME_BUDGET) -> Media | None:
    """A message content part -> the media it carries, prepared (None for text)."""
    kind = part.get("type")
    if kind in ("image_url", "image"):
        value = part["image_url"]["url"] if kind == "image_url" else part.get("image")
        detail = (part.get("image_url") or {}).get("detail") if kind == "image_url" else None
        budget = part.get("max_soft_tokens") or DETAIL_BUDGETS.get(detail or "", image_budget)
        patches = image_patches(_image(value), budget)
        return Media("image", hashlib.sha1(patches.pixels.numpy().tobytes()).hexdigest(), [patches])
    if kind in ("input_audio", "audio"):
        value = base64.b64decode(part["input_audio"]["data"]) if kind == "input_audio" else part.get("audio")
        samples = _audio(value)
        return Media("audio", hashlib.sha1(samples.tobytes()).hexdigest(), clips=clips(samples))
    if kind in ("video_url", "video"):
        return _video(part["video_url"]["url"] if kind == "video_url" else part.get("video"), part.get("max_soft_tokens") or frame_budget)
    return None


KINDS = {"image_url": "image", "image": "image", "input_audio": "audio", "audio": "audio", "video_url": "video", "video": "video"}


def split_media(
    messages: Sequence[Mapping[str, Any]], reads: set[str], image_budget: int = DEFAULT_BUDGET, hint: str = ""
) -> tuple[list[dict[str, Any]], list[Media]]:
    """Messages -> (the same messages with each media part as a bare placeholder part for the
    chat template, the media in prompt order). `reads`: the kinds the model takes; any other is
    refused before anything is read (`hint` says why, where there is more to say)."""
    out, media = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts = []
        for part in content:
            kind = KINDS.get(part.get("type", ""))
            if kind is not None and kind not in reads:
                raise Gemma4Error(f"this model has no encoder for {kind}: it reads {', '.join(sorted(reads | {'text'}))}{hint}")
            item = read_part(part, image_budget)
            if item is None:
                parts.append(part)
            else:
                media.append(item)
                parts.append({"type": item.kind})
        out.append({**message, "content": parts})
    return out, media


def expand(text: str, media: list[Media]) -> str:
    """Rendered prompt text with one placeholder per media item -> each placeholder replaced by
    its soft-token run, as `Gemma4Processor` replaces it."""
    pieces = re.split("(" + "|".join(re.escape(p) for p in PLACEHOLDER.values()) + ")", text)
    found = [p for p in pieces if p in PLACEHOLDER.values()]
    if [PLACEHOLDER[m.kind] for m in media] != found:
        raise Gemma4Error(f"the prompt has {len(found)} media placeholders for {len(media)} attachments: the chat template dropped or added some")
    queue = iter(media)
    return "".join(next(queue).expansion() if p in PLACEHOLDER.values() else p for p in pieces)


def build_prompt(text: str, media: list[Media], tokenizer: Tokenizer, encoders: MediaEncoders | None, hidden: int, bidirectional: bool) -> Prompt:
    """Rendered prompt text with one placeholder per media item -> the Prompt to prefill."""
    ids = tokenizer.prompt_ids(expand(text, media))
    if not media:
        return Prompt(ids)
    reads = readable(encoders)
    if missing := sorted({m.kind for m in media} - reads):
        raise Gemma4Error(f"this model has no encoder for {' or '.join(missing)}: it reads {', '.join(sorted(reads | {'text'}))}")
    soft = _encode(media, tokenizer, encoders)
    vision_ids = [tokenizer.token_id("<|image|>"), tokenizer.token_id("<|video|>")]
    prompt_ids = torch.tensor([ids])
    inputs = merge(prompt_ids, soft, hidden, vision_ids if bidirectional else None)  # type: ignore[arg-type]
    keys: list[Any] = list(ids)
    owners = iter(m.key for m in media for _ in range(m.tokens))
    for i, token in enumerate(ids):
        if inputs.mask[0, i]:
            keys[i] = (token, next(owners))
    return Prompt(ids, inputs, keys, [(m.kind, m.tokens, m.describe()) for m in media])


def readable(encoders: MediaEncoders | None) -> set[str]:
    """The media kinds a model's encoders take: video frames go through the vision tower."""
    reads = encoders.reads if encoders is not None else set()
    return ({"image", "video"} if "image" in reads else set()) | ({"audio"} if "audio" in reads else set())


@torch.inference_mode()
def _encode(media: list[Media], tokenizer: Tokenizer, encoders: MediaEncoders) -> dict[int, torch.Tensor]:
    """Soft tokens per placeholder id, in prompt order. Each image runs on its real patches only
    (padding patches change nothing: keys mask them, pooling drops them)."""
    out: dict[str, list[torch.Tensor]] = {"image": [], "video": [], "audio": []}
    for item in media:
        for patches in item.patches:
            real = patches.tokens * POOL * POOL
            out[item.kind].append(encoders.images(patches.pixels[None, :real], patches.positions[None, :real]))
        for clip in item.clips:
            out["audio"].append(encoders.audio(clip.features[None], clip.mask[None]))
    ids = {"image": "<|image|>", "video": "<|video|>", "audio": "<|audio|>"}
    return {tokenizer.token_id(ids[kind]): torch.cat(tokens) for kind, tokens in out.items() if tokens}  # type: ignore[misc]


def processor_outputs(ids: list[int], media: list[Media], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """What `Gemma4Processor` returns for a prompt and its media: the ids, their mask and media types
    (1 image, 2 video, 3 audio), and each encoder's inputs, padded as it pads them."""
    types = {tokenizer.token_id("<|image|>"): 1, tokenizer.token_id("<|video|>"): 2, tokenizer.token_id("<|audio|>"): 3}
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([[types.get(t, 0) for t in ids]])}

    def stacked(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
        width = max(len(t) for t in tensors)
        return torch.stack([torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, width - len(t)), value=fill) for t in tensors])

    images = [p for m in media if m.kind == "image" for p in m.patches]
    if images:
        out["pixel_values"], out["image_position_ids"] = stacked([p.pixels for p in images], 0.0), stacked([p.positions for p in images], -1)
    videos = [m for m in media if m.kind == "video"]
    if videos:
        frames = [p for m in videos for p in m.patches]
        out["pixel_values_videos"], out["video_position_ids"] = stacked([p.pixels for p in frames], 0.0), stacked([p.positions for p in frames], -1)
        out["num_frames_per_video"] = torch.tensor([len(m.patches) for m in videos])
    sounds = [c for m in media if m.kind == "audio" for c in m.clips]
    if sounds:
        out["input_features"] = stacked([c.features for c in sounds], 0.0)
        out["input_features_mask"] = torch.stack([torch.nn.functional.pad(c.mask, (0, out["input_features"].shape[1] - len(c.mask))) for c in sounds])
    return out
