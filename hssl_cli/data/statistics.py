"""The means and stds that standardise what a model reads: per-channel pixel statistics of a split (the
engine's data.mean/std), and the statistics of augmentation parameter vectors (EquiMod's)."""

from __future__ import annotations

import math

import torch

from hssl_cli.data.augment import Augmenter
from hssl_cli.recipe import AugmentConfig


class ChannelStats:
    """Running per-channel sums of uint8 images in [0, 1] units, float64, over chunks of `chunk_size` images:
    fed the same chunks in the same order (in memory, or streamed), it gives the same sums bit for bit."""

    def __init__(self, channels: int, sample_shape: tuple[int, ...], chunk_elements: int = 1 << 22,
                 device: torch.device | str = "cpu"):
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.total_squares = torch.zeros_like(self.total)
        self.chunk_size = max(1, chunk_elements // max(1, math.prod(sample_shape)))
        self.count = 0

    def add(self, chunk: torch.Tensor) -> None:
        values = chunk.to(self.total.device, torch.float64) / 255.0
        self.total += values.sum(dim=(0, 2, 3))
        self.total_squares += values.square().sum(dim=(0, 2, 3))
        self.count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.total_squares / self.count - mean.square()).clamp_min(0).sqrt()


def channel_stats(images: torch.Tensor, chunk_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of uint8 (N, C, H, W) images in [0, 1] units, float64.

    Chunked so that a whole dataset never exists as float64 at once.
    """
    stats = ChannelStats(images.shape[1], tuple(images.shape[1:]), chunk_elements, images.device)
    for chunk in images.split(stats.chunk_size):
        stats.add(chunk)
    return stats.result()


def param_vector_stats(configs: AugmentConfig | list[AugmentConfig], image_size: int, samples: int = 16384,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of `ViewParams.as_vector()` under the augmentation distribution itself (pooled over the
    distinct `configs` of the views, e.g. BYOL's asymmetric pair), estimated from `samples` draws of each
    (EquiMod standardises its parameter vectors with these). Constant columns get std 1, so they
    standardise to 0 instead of dividing by zero. image_size: the side of the images the crops cut."""
    distinct = {config.model_dump_json(): config for config in ([configs] if isinstance(configs, AugmentConfig)
                                                               else configs)}
    unit = torch.ones(1)
    vectors = torch.cat([
        Augmenter(config, image_size, unit * 0.5, unit * 0.5).sample(
            samples, torch.Generator().manual_seed(seed), "cpu").as_vector().double()
        for config in distinct.values()
    ])  # fmt: skip
    std = vectors.std(dim=0)
    return vectors.mean(dim=0).float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()
