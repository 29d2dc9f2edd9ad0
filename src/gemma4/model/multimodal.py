"""The encoders a multimodal checkpoint ships beside its decoder, and how their soft tokens take
the place of the placeholder tokens (`Gemma4Model.forward`): images and video frames through the
vision tower, audio through the audio tower, each projected into the text model's width."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .audio import AudioEncoder
from .transformer import MediaInputs
from .vision import MultimodalEmbedder, VisionEncoder


class MediaEncoders(nn.Module):
    """`model.vision_tower`, `model.embed_vision`, `model.audio_tower`, `model.embed_audio` (those the config has)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        text = config.text.hidden_size
        if config.vision is not None:
            self.vision_tower = VisionEncoder(config.vision)
            self.embed_vision = MultimodalEmbedder(config.vision.hidden_size, text, config.vision.rms_norm_eps)
        if config.audio is not None:
            self.audio_tower = AudioEncoder(config.audio)
            self.embed_audio = MultimodalEmbedder(config.audio.output_proj_dims, text, config.audio.rms_norm_eps)

    @property
    def reads(self) -> set[str]:
        """The media this model can take: "image" (and video), "audio"."""
        return {media for media, tower in (("image", "vision_tower"), ("audio", "audio_tower")) if hasattr(self, tower)}

    def images(self, pixels: Tensor, positions: Tensor) -> Tensor:
        """Patches [N, P, 768], positions [N, P, 2] -> soft tokens [tokens of all N, text hidden]."""
        return self.embed_vision(self.vision_tower(pixels, positions))

    def audio(self, features: Tensor, mask: Tensor) -> Tensor:
        """Mel features [N, frames, 128], mask [N, frames] -> soft tokens [real tokens of all N, text hidden]."""
        tokens, valid = self.audio_tower(features, mask)
        return self.embed_audio(tokens)[valid]


def vision_blocks(ids: Tensor, vision_ids: list[int]) -> Tensor:
    """[B, T]: each contiguous run of image or video placeholders is one block (0, 1, ... per row); -1 elsewhere."""
    is_vision = torch.isin(ids, torch.tensor(vision_ids))
    starts = is_vision & ~torch.cat([torch.zeros_like(is_vision[:, :1]), is_vision[:, :-1]], dim=1)
    return torch.where(is_vision, torch.cumsum(starts.long(), dim=1) - 1, -1)


def merge(ids: Tensor, soft: dict[int, Tensor], hidden: int, vision_ids: list[int] | None) -> MediaInputs:
    """Soft tokens, per placeholder id, into the rows of `ids` in reading order.

    vision_ids: the placeholders whose runs attend both ways on sliding layers (the server
    models' `use_bidirectional_attention="vision"`), or None."""
    embeds = torch.zeros(*ids.shape, hidden, dtype=next(iter(soft.values())).dtype if soft else torch.float32)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for token_id, tokens in soft.items():
        where = ids == token_id
        if int(where.sum()) != tokens.shape[0]:
            raise ValueError(f"the prompt has {int(where.sum())} placeholders (token {token_id}) but the media make {tokens.shape[0]} soft tokens")
        embeds[where] = tokens
        mask |= where
    return MediaInputs(embeds, mask, None if vision_ids is None else vision_blocks(ids, vision_ids))
