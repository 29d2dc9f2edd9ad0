"""Audio -> log-mel frames for the audio encoder (`Gemma4AudioFeatureExtractor`): 16 kHz mono,
20 ms frames every 10 ms with 160 samples of semicausal padding, a periodic Hann window, a 512-point
FFT, magnitudes through 128 HTK mel filters, log(mel + 0.001). Each 40 ms becomes one soft token.

The reference cuts a clip at 30 s without a word; here a longer clip is split into 30 s windows,
each encoded in turn as a clip of its own, and the caller is told how many tokens it costs."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import Gemma4Error

RATE = 16_000
WINDOW_SAMPLES = 480_000  # 30 s: what the encoder was built for (the reference's max_length)
FRAME, HOP, FFT, MELS = 320, 160, 512, 128
MEL_FLOOR = 1e-3
PAD_TO = 128  # samples: the reference pads every clip to a multiple of this


@dataclass
class Features:
    """One clip (at most 30 s) for the audio encoder."""

    features: Tensor  # [frames, 128] fp32 log-mel, zero on padding frames
    mask: Tensor  # [frames] bool: True on real frames
    tokens: int  # soft tokens it becomes
    seconds: float


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """[257, 128] triangular filters on the HTK mel scale, 0 .. 8 kHz, unnormalised (float64)."""
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    mels = np.linspace(to_mel(0.0), to_mel(RATE / 2), MELS + 2)
    centers = 700.0 * (np.power(10, mels / 2595.0) - 1.0)
    bins = np.linspace(0, RATE // 2, FFT // 2 + 1)
    slopes = centers[None, :] - bins[:, None]
    widths = np.diff(centers)
    down, up = -slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


@lru_cache(maxsize=1)
def hann() -> np.ndarray:
    return np.hanning(FRAME + 1)[:-1].astype(np.float32)  # periodic


def soft_tokens(frames: int) -> int:
    """Tokens the encoder makes of `frames` mel frames: two stride-2 convolutions (kernel 3, padding 1)."""
    for _ in range(2):
        frames = (frames + 2 - 3) // 2 + 1
    return frames


def log_mel(samples: np.ndarray) -> Features:
    """A clip of at most 30 s of 16 kHz mono samples -> its features, as the reference computes them."""
    length = len(samples)
    padded = np.pad(samples, (0, -length % PAD_TO))
    mask = np.pad(np.ones(length, dtype=np.int32), (0, len(padded) - length))
    wave = np.pad(padded[None], ((0, 0), (FRAME // 2, 0)))  # semicausal: the first frame ends on the first sample
    mask = np.pad(mask, (FRAME // 2, 0))
    span = FRAME + 1
    count = (wave.shape[1] - span) // HOP + 1
    if count <= 0:
        raise Gemma4Error(f"an audio clip of {length} samples ({length / RATE * 1000:.1f} ms) is too short to hear")
    frames = np.lib.stride_tricks.as_strided(wave, (1, count, span), (wave.strides[0], wave.strides[1] * HOP, wave.strides[1]))
    spectrum = np.abs(np.fft.rfft(frames[..., :-1] * hann(), n=FFT, axis=-1))
    features = np.log(np.matmul(spectrum, mel_filters()) + np.array(MEL_FLOOR, dtype=np.float64))[0].astype(np.float32)
    real = mask[np.arange(count) * HOP + span - 1].astype(bool)
    features = features * real[:, None]
    return Features(torch.from_numpy(features), torch.from_numpy(real), soft_tokens(int(real.sum())), length / RATE)


def clips(samples: np.ndarray) -> list[Features]:
    """A recording of any length -> 30 s windows, each a clip the encoder reads whole."""
    if samples.ndim != 1 or len(samples) == 0:
        raise Gemma4Error("audio must be one channel of samples, at least one")
    return [log_mel(samples[i : i + WINDOW_SAMPLES]) for i in range(0, len(samples), WINDOW_SAMPLES)]


def load_audio(source: str | Path | bytes, rate: int | None = None) -> np.ndarray:
    """A file (WAV, FLAC, OGG, MP3: what libsndfile reads), its bytes, or raw samples -> 16 kHz mono float32.
    Other rates are resampled (soxr, high quality); several channels are averaged."""
    import soundfile

    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as e:
        where = "the audio data" if isinstance(source, bytes) else str(source)
        raise Gemma4Error(f"{where}: not an audio file this engine reads (WAV, FLAC, OGG, MP3): {e}") from None
    return to_16k(data.mean(axis=1), rate)


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    samples = np.asarray(samples, dtype=np.float32)
    return samples if rate == RATE else soxr.resample(samples, rate, RATE, quality="HQ").astype(np.float32)
