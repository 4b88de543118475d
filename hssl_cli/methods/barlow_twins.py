"""Barlow Twins (Zbontar et al. 2021): projector g, the cross-correlation of the two views' standardised
embeddings pushed to the identity; with local views (multi-crop) the mean over every (global, other) pair."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import barlow_twins
from hssl_cli.methods.base import SSLMethod, ViewFeatures, mean_over_view_pairs, project_views
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


class BarlowTwins(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.redundancy_weight = recipe.method.redundancy_weight

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        global_z, local_z = project_views(self.projector, ViewFeatures(self.backbone, views))
        return mean_over_view_pairs(global_z, local_z, lambda z1, z2: barlow_twins(
            z1, z2, self.redundancy_weight, gather_distributed=True))
