"""Video -> sampled frames, each patched as an image with its timestamp (`Gemma4VideoProcessor`):
up to 32 frames taken evenly (frame i * total // 32), each scaled to a budget of 70 soft tokens by
default with antialiased bicubic resampling (torchvision's, which the reference uses, done here with
`torch.nn.functional.interpolate`), rescaled to [0, 1]. In the prompt each frame reads
`mm:ss <|image>` + its soft tokens + `<image|>`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import Gemma4Error
from .image import BUDGETS, Patches, patches_of, target_size

MAX_FRAMES = 32
DEFAULT_FRAME_BUDGET = 70


@dataclass
class Frames:
    frames: list[Patches]
    seconds: list[float]  # each frame's time in the video


def sample_indices(total: int, count: int = MAX_FRAMES) -> np.ndarray:
    """Evenly spread frame indices (the reference's `default_sample_indices_fn`); a video shorter than
    `count` frames gives all of its frames (the reference refuses it)."""
    count = min(count, total)
    return np.arange(count, dtype=int) * total // count


def read_video(path: str | Path) -> tuple[list[np.ndarray], float]:
    """All frames of a video file as RGB uint8 [H, W, 3], and its frame rate (PyAV: FFmpeg's decoders)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 24)
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise Gemma4Error(f"{path}: not a video this engine can read ({e})") from None
    if not frames:
        raise Gemma4Error(f"{path}: the video has no frames")
    return frames, rate


def video_frames(frames: list[np.ndarray], rate: float, budget: int = DEFAULT_FRAME_BUDGET, count: int = MAX_FRAMES) -> Frames:
    """Decoded RGB frames [H, W, 3] uint8 -> the sampled frames as the vision encoder reads them."""
    if budget not in BUDGETS:
        raise Gemma4Error(f"a frame budget of {budget} soft tokens is not one of {', '.join(map(str, BUDGETS))}")
    indices = sample_indices(len(frames), count)
    video = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2)  # [F, 3, H, W] uint8
    height, width = target_size(video.shape[2], video.shape[3], budget)
    if (height, width) != tuple(video.shape[2:]):
        resized = F.interpolate(video.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        video = resized.round_().clamp_(0, 255).to(torch.uint8)
    pixels = (video.float() / 255.0).numpy()  # the reference normalises with mean 0, std 255
    return Frames([patches_of(frame, budget) for frame in pixels], [int(i) / rate for i in indices])


def timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"
