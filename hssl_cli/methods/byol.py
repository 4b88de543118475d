"""BYOL (Grill et al. 2020): online f, g, q; target = EMA of f, g; symmetrised 2 - 2 cos. Without the EMA
target (`ema: false`) it is SimSiam (Chen & He 2021).

The target network's pieces (make_target, target_momentum, update_target) are shared with DirectPred and
H-SSL, the whole online/target architecture (OnlineAndTarget) with MoCo v3.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine
from hssl_cli.methods.base import SSLMethod, ViewFeatures
from hssl_cli.methods.equimod import EquiModBranch
from hssl_cli.methods.essl import RotationPredictionBranch
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


def make_target(backbone: nn.Module, projector: nn.Module) -> nn.ModuleDict:
    """A frozen copy of the online backbone and projector (checkpoint prefix `target.`)."""
    target = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(projector)})
    return target.requires_grad_(False)


def target_momentum(progress: float, ema_start: float) -> float:
    # tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2, k / K = progress
    return 1 - (1 - ema_start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def update_target(target: nn.ModuleDict, backbone: nn.Module, projector: nn.Module, tau: float) -> None:
    # target <- tau target + (1 - tau) online; buffers (BatchNorm statistics) are copied
    online = [*backbone.parameters(), *projector.parameters()]
    torch._foreach_lerp_(list(target.parameters()), online, 1 - tau)
    online_buffers = [*backbone.buffers(), *projector.buffers()]
    target_buffers = list(target.buffers())
    if len(target_buffers) != len(online_buffers):
        raise ValueError(f"target has {len(target_buffers)} buffers, the online networks {len(online_buffers)}")
    torch._foreach_copy_(target_buffers, online_buffers)  # one fused call, not a Python loop of copies


class OnlineAndTarget(SSLMethod):
    """BYOL's architecture, shared with MoCo v3: online f, g and predictor q; a target f, g (the EMA of the
    online ones, its rate raised from method.ema_start to 1 by a cosine) that receives no gradient."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, with_target: bool = True):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.predictor = mlp(recipe.model.projector[-1], recipe.method.predictor)
        self.target = make_target(backbone, self.projector) if with_target else None
        self.ema_start = recipe.method.ema_start

    @torch.no_grad()
    def target_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.target["projector"](self.target["backbone"](images))

    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))


class BYOL(OnlineAndTarget):
    """`ema: false` is SimSiam: the target of each view's prediction is the online embedding of the other view,
    under stop-gradient, from the same forward pass."""

    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone, recipe, with_target=recipe.method.ema)
        equimod = recipe.method.equimod
        self.equimod = EquiModBranch.from_recipe(backbone.feature_dim, recipe) if equimod else None
        essl = recipe.method.essl
        self.essl = RotationPredictionBranch(backbone.feature_dim, essl) if essl else None

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        base_views = views if self.essl is None else self.essl.base_views(views, self.equimod is not None)
        features = ViewFeatures(self.backbone, base_views)
        z = self.projector(torch.cat(features.global_features))
        p1, p2 = self.predictor(z).chunk(2)
        if self.target is None:  # SimSiam: sg(z) of the other view
            t1, t2 = z.detach().chunk(2)
        else:
            t1, t2 = self.target_embeddings(torch.cat(views.global_views)).chunk(2)
        losses = {"loss": byol_cosine(p1, t2) + byol_cosine(p2, t1)}
        if self.equimod is not None:
            losses = self.equimod.add_to(losses["loss"], features.global_features, features.original,
                                         views.global_params, generator)
        if self.essl is not None:
            losses = self.essl.add_to(losses, self.backbone, views, generator)
        return losses
