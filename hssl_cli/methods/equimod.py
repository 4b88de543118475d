"""EquiMod (Devillers & Lefort 2023): an equivariance branch added to SimCLR or BYOL.

y = g_eq(f(.)) on the un-augmented x0 and on each view t(x); y_hat_t = u([y0 ; enc(a_t)]) predicts the
view's embedding from x0's and the view's standardised augmentation parameters a_t;
L_equi = NT-Xent over {y_hat_t1, y_hat_t2, y_t1, y_t2} with positives (y_hat_t, y_t), temperature tau_y.
`params: permuted` feeds u a_pi(t), the parameters of another image's view (pi drawn each step): the ablation
that keeps every pass, head, loss term and negative and removes only what ties a_t to the view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.data.augment import PARAM_NAMES, ViewParams
from hssl_cli.data.statistics import param_vector_stats
from hssl_cli.losses import info_nce
from hssl_cli.methods.base import random_permutation
from hssl_cli.models.heads import EquiModPredictor, mlp
from hssl_cli.recipe import AugmentConfig, EquiModConfig, Recipe


class EquiModBranch(nn.Module):
    def __init__(self, feature_dim: int, config: EquiModConfig, augment: AugmentConfig | list[AugmentConfig],
                 image_size: int):
        """augment: the distribution(s) of the global views, whose parameter vectors a_t standardise."""
        super().__init__()
        self.projector = mlp(feature_dim, config.projector, last_batchnorm=True)  # g_eq
        self.predictor = EquiModPredictor(len(PARAM_NAMES), config.param_embedding, config.projector[-1])
        mean, std = param_vector_stats(augment, image_size)
        self.register_buffer("param_mean", mean)
        self.register_buffer("param_std", std)
        self.temperature = config.temperature
        self.weight = config.weight
        self.permuted = config.params == "permuted"

    @classmethod
    def from_recipe(cls, feature_dim: int, recipe: Recipe) -> EquiModBranch:
        augments = [view.augment for view in recipe.resolved_views() if view.role == "global"]
        return cls(feature_dim, recipe.method.equimod, augments, recipe.data.image_size)

    def forward(self, view_features: list[torch.Tensor], original_features: torch.Tensor,
                params: list[ViewParams], generator: torch.Generator) -> dict[str, torch.Tensor]:
        count = len(view_features)
        embeddings = self.projector(torch.cat([*view_features, original_features])).float()
        *views, original = embeddings.chunk(count + 1)
        standardized = [(p.as_vector() - self.param_mean) / self.param_std for p in params]
        if self.permuted:  # a_pi(t): each view's rows reordered by its own permutation of the batch
            standardized = [a[random_permutation(len(a), generator, a.device)] for a in standardized]
        predicted = self.predictor(original.repeat(count, 1), torch.cat(standardized)).float().chunk(count)
        loss = info_nce(torch.cat(predicted), torch.cat(views), self.temperature, gather_distributed=True)
        with torch.no_grad():
            # gain = cos(y_t, y_hat_t) - cos(y_t, y_0): 0 means the predictor ignores a_t (invariance)
            gain = torch.stack([F.cosine_similarity(y, y_hat).mean() - F.cosine_similarity(y, original).mean()
                                for y, y_hat in zip(views, predicted, strict=True)]).mean()
        return {"loss/equivariance": loss, "equimod/gain": gain}

    def add_to(self, invariance: torch.Tensor, view_features: list[torch.Tensor], original_features: torch.Tensor,
               params: list[ViewParams], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """L = L_inv + lambda L_equi, with both terms and the gain reported."""
        terms = self(view_features, original_features, params, generator)
        return {"loss": invariance + self.weight * terms["loss/equivariance"], "loss/invariance": invariance, **terms}

