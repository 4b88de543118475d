"""The discrete scale semigroup of a multi-scale lifting: the one place that defines how it acts.

Level k of an image is the image down-scaled by 2^k with 2^k x 2^k average pooling, S^k x. Pooling
composes exactly, S^j S^k x = S^(j+k) x (for sizes divisible by 2^(j+k)), so a network with shared weights
over the levels, z_k(x) = f(S^k x), is equivariant by construction: z_k(S^j x) = z_(k+j)(x), a shift along
the scale axis (L_j z)_k = z_(k+j), truncated at the coarsest level (a semigroup: nothing comes in from
finer than the finest level). Any other down-scaling (bilinear interpolation, a factor that is no power
of 2) is not S^j, and the identity holds only approximately: measured by `hssl equivariance-check`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTOR = 2  # each level halves the image's side


def downscale(images: torch.Tensor, level: int) -> torch.Tensor:
    """S^level x: (B, C, H, W) -> (B, C, H / 2^level, W / 2^level) by average pooling; exact composition."""
    if level == 0:
        return images
    size = FACTOR ** level
    if images.shape[-1] % size or images.shape[-2] % size:
        raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} px do not split into {size}x{size} "
                         f"blocks (scale level {level}); use a size divisible by {size}")
    return F.avg_pool2d(images, size)


def coarsen(images: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """S^k x shown at the input's size, k = levels[i] per image: every 2^k x 2^k block replaced by its mean
    (nearest upsampling of S^k x). What an input-space method with a fixed input size (A-SSL) can do with the
    scale action; a network on it does not compute z_k(x)."""
    coarse = images
    for level in range(1, int(levels.max()) + 1 if len(levels) else 1):
        blocks = F.interpolate(downscale(images, level), scale_factor=FACTOR ** level, mode="nearest")
        coarse = torch.where((levels == level).view(-1, 1, 1, 1), blocks, coarse)
    return coarse


def downscale_bilinear(images: torch.Tensor, level: int) -> torch.Tensor:
    """The same size as S^level x by antialiased bilinear resizing: not S^level (another filter), so the
    lifting's identity holds only approximately for it."""
    size = FACTOR ** level
    return F.interpolate(images, size=(images.shape[-2] // size, images.shape[-1] // size), mode="bilinear",
                         antialias=True, align_corners=False)


def shift_levels(lifted: torch.Tensor, steps: int) -> tuple[torch.Tensor, slice]:
    """(L_j z)_k = z_(k+j) for the levels k < K - j that exist: (the shifted fibres, the levels they fill)."""
    levels = lifted.shape[1]
    return lifted[:, steps:], slice(0, levels - steps)
