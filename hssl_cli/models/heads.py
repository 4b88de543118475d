"""MLP heads: projector g and predictor q."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(in_dim: int, widths: Sequence[int], last_batchnorm: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU for every hidden width, then a plain Linear (optionally a BN without affine)."""
    layers: list[nn.Module] = []
    previous = in_dim
    for width in widths[:-1]:
        layers += [nn.Linear(previous, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        previous = width
    layers.append(nn.Linear(previous, widths[-1], bias=not last_batchnorm))
    if last_batchnorm:
        layers.append(nn.BatchNorm1d(widths[-1], affine=False))
    return nn.Sequential(*layers)
