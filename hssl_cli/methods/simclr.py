"""SimCLR (Chen et al. 2020): two views, projector g, NT-Xent over the 2N embeddings."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.losses import info_nce
from hssl_cli.methods.base import SSLMethod
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import ModelConfig, SimCLRConfig


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, model: ModelConfig, config: SimCLRConfig):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, model.projector)
        self.temperature = config.temperature

    def forward(self, views: list[torch.Tensor], augmentation_params=None, original=None) -> dict[str, torch.Tensor]:
        z1, z2 = self.projector(self.backbone(torch.cat(views))).chunk(2)  # z = g(f(t(x)))
        return {"loss": info_nce(z1, z2, self.temperature, gather_distributed=True)}
