"""MoCo v3 (Chen, Xie & He 2021): online f, g, q give the queries q(g(f(x))); a momentum encoder (EMA of f
and g, checkpoint prefix `target.`) gives the keys; L = ctr(q1, k2) + ctr(q2, k1), the other images' keys of
every rank as negatives. BYOL's architecture with a contrastive loss instead of the cosine."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import momentum_contrast
from hssl_cli.methods.byol import OnlineAndTarget
from hssl_cli.recipe import Recipe


class MoCoV3(OnlineAndTarget):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone, recipe)
        self.temperature = recipe.method.temperature

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        both = torch.cat(views.global_views)
        q1, q2 = self.predictor(self.projector(self.backbone(both))).chunk(2)
        k1, k2 = self.target_embeddings(both).chunk(2)
        loss = (momentum_contrast(q1, k2, self.temperature, gather_distributed=True)
                + momentum_contrast(q2, k1, self.temperature, gather_distributed=True))
        return {"loss": loss}
