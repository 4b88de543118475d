"""MoCo v3 (Chen, Xie & He 2021): online f, g, q give the queries q(g(f(x))); a momentum encoder (EMA of f
and g, checkpoint prefix `target.`) gives the keys; L = ctr(q1, k2) + ctr(q2, k1), the other images' keys of
every rank as negatives. BYOL's architecture with a contrastive loss instead of the cosine; with local views
(multi-crop) the keys come from the global views only and every view's query meets the key of every other
global view (base.loss_over_target_pairs)."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import momentum_contrast
from hssl_cli.methods.base import ViewFeatures, loss_over_target_pairs
from hssl_cli.methods.byol import OnlineAndTarget
from hssl_cli.recipe import Recipe


class MoCoV3(OnlineAndTarget):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone, recipe)
        self.temperature = recipe.method.temperature

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        queries, keys = self.predictions_and_targets(ViewFeatures(self.backbone, views), views)
        return {"loss": loss_over_target_pairs(queries, keys, lambda query, key: momentum_contrast(
            query, key, self.temperature, gather_distributed=True))}  # 2 views: ctr(q1, k2) + ctr(q2, k1)
