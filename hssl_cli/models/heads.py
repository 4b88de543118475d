"""MLP heads: projector g and predictor q; DINO's head (MLP, L2 normalisation, weight-normalised prototypes)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(in_dim: int, widths: Sequence[int], last_batchnorm: bool = False, layer_norm: bool = False,
        hidden_norm: bool = True, activation: Callable[[], nn.Module] = functools.partial(nn.ReLU, inplace=True)
        ) -> nn.Sequential:
    """Linear-BN-ReLU for every hidden width (Linear-LayerNorm-ReLU with layer_norm), then a plain Linear
    (optionally a BN without affine). Without hidden_norm the hidden layers are Linear (with bias)-activation."""
    layers: list[nn.Module] = []
    previous = in_dim
    for width in widths[:-1]:
        if hidden_norm:
            norm = nn.LayerNorm(width) if layer_norm else nn.BatchNorm1d(width)
            layers += [nn.Linear(previous, width, bias=False), norm, activation()]
        else:
            layers += [nn.Linear(previous, width), activation()]
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


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021): an MLP to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer to K prototypes, w_k = g_k v_k / |v_k|, with g fixed to 1 (`normalised`, the paper's
    norm_last_layer) or learned from |v_k|. GELU and no BatchNorm in the MLP unless `batchnorm` (the authors'
    choice for ResNet-50); torch's default initialisation (the authors': truncated normal, std 0.02).

    `last_layer_trainable` (a buffer, 0 or 1) scales the gradient that reaches the prototypes (v and g) without
    changing the output: 0 freezes them (the first epoch in the paper) while every parameter still takes part in
    the step, as DDP requires."""

    def __init__(self, in_dim: int, widths: Sequence[int], prototypes: int, normalised: bool = True,
                 batchnorm: bool = False):
        super().__init__()
        self.mlp = mlp(in_dim, widths, hidden_norm=batchnorm, activation=nn.GELU)
        self.prototypes = nn.Parameter(nn.Linear(widths[-1], prototypes, bias=False).weight.detach())  # v
        self.scale = None if normalised else nn.Parameter(self.prototypes.detach().norm(dim=1, keepdim=True))  # g
        self.register_buffer("last_layer_trainable", torch.ones(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bottleneck = nn.functional.normalize(self.mlp(features), dim=1)
        # lerp(sg(v), v, a) equals v; its gradient reaches v scaled by a
        direction = torch.lerp(self.prototypes.detach(), self.prototypes, self.last_layer_trainable)
        weight = nn.functional.normalize(direction, dim=1)
        if self.scale is not None:
            weight = torch.lerp(self.scale.detach(), self.scale, self.last_layer_trainable) * weight
        return nn.functional.linear(bottleneck, weight)
