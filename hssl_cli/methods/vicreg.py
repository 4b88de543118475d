"""VICReg (Bardes et al. 2022): invariance + variance + covariance on the two views' embeddings."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.losses import vicreg
from hssl_cli.methods.base import SSLMethod
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import ModelConfig, VICRegConfig


class VICReg(SSLMethod):
    def __init__(self, backbone: nn.Module, model: ModelConfig, config: VICRegConfig):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, model.projector)
        self.weights = config.model_dump(exclude={"name"})

    def forward(self, views: list[torch.Tensor], augmentation_params=None, original=None) -> dict[str, torch.Tensor]:
        z1, z2 = self.projector(self.backbone(torch.cat(views))).chunk(2)
        return vicreg(z1, z2, **self.weights, gather_distributed=True)
