"""Images -> 16-px patches at the size a soft-token budget allows (`Gemma4ImageProcessorPil`).

The image is scaled (up or down, bicubic, aspect ratio kept) to the largest size whose sides are
multiples of 48 px (3x3 patches make one soft token) and whose patches fit the budget x 9; pixels
are rescaled to [0, 1] (the encoder maps them to [-1, 1] itself). Patches are padded to the
budget's maximum with position (-1, -1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import Gemma4Error

BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens an image may cost
DEFAULT_BUDGET = 280
PATCH = 16
POOL = 3  # a soft token pools POOL x POOL patches


@dataclass
class Patches:
    """One image (or frame) for the vision encoder."""

    pixels: Tensor  # [budget * 9, 3 * 16 * 16] fp32 in [0, 1], each patch (row, column, channel)
    positions: Tensor  # [budget * 9, 2] (x, y) on the patch grid, (-1, -1) on padding
    tokens: int  # soft tokens it becomes

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels after resizing."""
        grid = self.positions[: self.tokens * POOL * POOL].max(dim=0).values + 1
        return int(grid[1]) * PATCH, int(grid[0]) * PATCH


def target_size(height: int, width: int, budget: int) -> tuple[int, int]:
    """The reference's `get_aspect_ratio_preserving_size`: the largest multiple-of-48 size within the budget."""
    max_patches = budget * POOL * POOL
    factor = math.sqrt(max_patches * PATCH**2 / (height * width))
    side = POOL * PATCH
    target_h = int(math.floor(factor * height / side)) * side
    target_w = int(math.floor(factor * width / side)) * side
    if target_h == 0 and target_w == 0:
        raise Gemma4Error(f"an image of {width}x{height} pixels is too small to make a single soft token")
    longest = (max_patches // POOL**2) * side
    if target_h == 0:  # a very wide image: one token high
        target_h, target_w = side, min(int(math.floor(width / height)) * side, longest)
    elif target_w == 0:
        target_w, target_h = side, min(int(math.floor(height / width)) * side, longest)
    return target_h, target_w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as `convert_to_rgb` does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def patches_of(pixels: np.ndarray, budget: int) -> Patches:
    """pixels: [3, H, W] fp32 in [0, 1] with H, W multiples of 48 -> patches padded to the budget."""
    channels, height, width = pixels.shape
    rows, cols = height // PATCH, width // PATCH
    grid = pixels.reshape(channels, rows, PATCH, cols, PATCH).transpose(1, 3, 2, 4, 0).reshape(rows * cols, -1)
    xs, ys = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([xs, ys], axis=-1).reshape(rows * cols, 2)
    padding = budget * POOL * POOL - rows * cols
    grid = np.pad(grid, [(0, padding), (0, 0)])
    positions = np.pad(positions, [(0, padding), (0, 0)], constant_values=-1)
    return Patches(torch.from_numpy(grid), torch.from_numpy(positions).long(), rows * cols // POOL**2)


def image_patches(image: Image.Image, budget: int = DEFAULT_BUDGET) -> Patches:
    """A PIL image -> what the vision encoder reads, as `Gemma4ImageProcessorPil` makes it."""
    if budget not in BUDGETS:
        raise Gemma4Error(f"an image budget of {budget} soft tokens is not one of {', '.join(map(str, BUDGETS))}")
    image = to_rgb(image)
    height, width = target_size(image.height, image.width, budget)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    pixels = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
    return patches_of(pixels, budget)
