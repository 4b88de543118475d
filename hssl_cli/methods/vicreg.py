"""VICReg (Bardes et al. 2022): invariance + variance + covariance on the two views' embeddings; with
local views (multi-crop) the mean over every (global, other view) pair."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import vicreg
from hssl_cli.methods.base import SSLMethod, ViewFeatures, mean_over_view_pairs, project_views
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


class VICReg(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.weights = recipe.method.model_dump(exclude={"name"})

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        global_z, local_z = project_views(self.projector, ViewFeatures(self.backbone, views))
        return mean_over_view_pairs(global_z, local_z,
                                    lambda z1, z2: vicreg(z1, z2, **self.weights, gather_distributed=True))
