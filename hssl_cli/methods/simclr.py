"""SimCLR (Chen et al. 2020): two views, projector g, NT-Xent over the 2N embeddings."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.losses import info_nce
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.equimod import EquiModBranch, backbone_features
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import ModelConfig, SimCLRConfig


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, model: ModelConfig, config: SimCLRConfig,
                 equimod: EquiModBranch | None = None):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, model.projector)
        self.temperature = config.temperature
        self.equimod = equimod
        self.needs_original = equimod is not None

    def forward(self, views: list[torch.Tensor], augmentation_params=None, original=None) -> dict[str, torch.Tensor]:
        features, original_features = backbone_features(self.backbone, views, original)
        z1, z2 = self.projector(torch.cat(features)).chunk(2)  # z = g(f(t(x)))
        loss = info_nce(z1, z2, self.temperature, gather_distributed=True)
        if self.equimod is None:
            return {"loss": loss}
        return self.equimod.add_to(loss, features, original_features, augmentation_params)
