"""SimCLR (Chen et al. 2020): two views, projector g, NT-Xent over the 2N embeddings; with local views
(multi-crop) the mean NT-Xent over every (global, other view) pair; optionally EquiMod's branch and E-SSL's
rotation prediction (methods/essl.py; with its views: local, the local views are that branch's alone)."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import info_nce
from hssl_cli.methods.base import SSLMethod, ViewFeatures, mean_over_view_pairs, project_views
from hssl_cli.methods.branches import base_views, with_branches
from hssl_cli.methods.equimod import EquiModBranch
from hssl_cli.methods.essl import RotationPredictionBranch
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


class SimCLR(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.temperature = config.temperature
        self.equimod = EquiModBranch.from_recipe(backbone.feature_dim, recipe) if config.equimod else None
        self.essl = RotationPredictionBranch(backbone.feature_dim, config.essl) if config.essl else None

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        features = ViewFeatures(self.backbone, base_views(views, self.equimod, self.essl))
        global_z, local_z = project_views(self.projector, features)  # z = g(f(t(x)))
        losses = mean_over_view_pairs(global_z, local_z, lambda z1, z2: {
            "loss": info_nce(z1, z2, self.temperature, gather_distributed=True)})
        return with_branches(losses, self.equimod, self.essl, self.backbone, features, views, generator)
