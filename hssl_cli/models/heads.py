"""MLP heads: projector g and predictor q."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(in_dim: int, widths: Sequence[int], last_batchnorm: bool = False, layer_norm: bool = False
        ) -> nn.Sequential:
    """Linear-BN-ReLU for every hidden width (Linear-LayerNorm-ReLU with layer_norm), then a plain Linear
    (optionally a BN without affine)."""
    layers: list[nn.Module] = []
    previous = in_dim
    for width in widths[:-1]:
        norm = nn.LayerNorm(width) if layer_norm else nn.BatchNorm1d(width)
        layers += [nn.Linear(previous, width, bias=False), norm, nn.ReLU(inplace=True)]
        previous = width
    layers.append(nn.Linear(previous, widths[-1], bias=not last_batchnorm))
    if last_batchnorm:
        layers.append(nn.BatchNorm1d(widths[-1], affine=False))
    return nn.Sequential(*layers)


class EquiModPredictor(nn.Module):
    """EquiMod's u([y0 ; enc(a_t)]): enc is Linear+BN to `embedding` dims, u one Linear + BN(affine=False)."""

    def __init__(self, param_dim: int, embedding: int, out_dim: int):
        super().__init__()
        self.param_encoder = nn.Sequential(nn.Linear(param_dim, embedding), nn.BatchNorm1d(embedding))
        self.predictor = nn.Sequential(nn.Linear(out_dim + embedding, out_dim), nn.BatchNorm1d(out_dim, affine=False))

    def forward(self, original_embedding: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.predictor(torch.cat([original_embedding, self.param_encoder(params)], dim=1))
