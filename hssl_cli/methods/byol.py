"""BYOL (Grill et al. 2020): online f, g, q; target = EMA of f, g; symmetrised 2 - 2 cos. Without the EMA
target (`ema: false`) it is SimSiam (Chen & He 2021). With local views (multi-crop, as DINO's) the target reads
the global views only, the online networks every view; each view's prediction meets the target of every other
global view (base.loss_over_target_pairs).

The target network's pieces (make_target, target_momentum, update_target, global_targets) are shared with
DirectPred and H-SSL, the whole online/target architecture (OnlineAndTarget) with MoCo v3.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine
from hssl_cli.methods.base import SSLMethod, ViewFeatures, loss_over_target_pairs, project_views
from hssl_cli.methods.branches import base_views, with_branches
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


@torch.no_grad()
def global_targets(target: nn.ModuleDict | None, views: Views, global_embeddings: list[torch.Tensor]
                   ) -> list[torch.Tensor]:
    """The target of each global view: the target network's g(f(x_i)), or without one (SimSiam) the online
    embedding z_i under stop-gradient. No local view is ever a target."""
    if target is None:
        return [z.detach() for z in global_embeddings]
    embeddings = target["projector"](target["backbone"](torch.cat(views.global_views)))
    return list(embeddings.chunk(len(views.global_views)))


class OnlineAndTarget(SSLMethod):
    """BYOL's architecture, shared with MoCo v3: online f, g and predictor q; a target f, g (the EMA of the
    online ones, its rate raised from method.ema_start to 1 by a cosine) that receives no gradient."""

    def __init__(self, backbone: nn.Module, recipe: Recipe, with_target: bool = True):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.predictor = mlp(recipe.model.projector[-1], recipe.method.predictor)
        self.target = make_target(backbone, self.projector) if with_target else None
        self.ema_start = recipe.method.ema_start

    def predictions_and_targets(self, features: ViewFeatures, views: Views
                                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """q(g(f(x_v))) of every view, the global ones first (one pass of g and q over all of them), and the
        target of each global view."""
        global_z, local_z = project_views(self.projector, features)
        every_view = [*global_z, *local_z]
        predictions = list(self.predictor(torch.cat(every_view)).chunk(len(every_view)))
        return predictions, global_targets(self.target, views, global_z)

    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))


class BYOL(OnlineAndTarget):
    """`ema: false` is SimSiam: the target of each view's prediction is the online embedding of the other
    global view (of each global view, for a local view), under stop-gradient, from the same forward pass."""

    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone, recipe, with_target=recipe.method.ema)
        equimod = recipe.method.equimod
        self.equimod = EquiModBranch.from_recipe(backbone.feature_dim, recipe) if equimod else None
        essl = recipe.method.essl
        self.essl = RotationPredictionBranch(backbone.feature_dim, essl) if essl else None

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        loss_views = base_views(views, self.equimod, self.essl)
        features = ViewFeatures(self.backbone, loss_views)
        predictions, targets = self.predictions_and_targets(features, loss_views)
        losses = {"loss": loss_over_target_pairs(predictions, targets, byol_cosine)}  # 2 views: l(p1, t2) + l(p2, t1)
        return with_branches(losses, self.equimod, self.essl, self.backbone, features, views, generator)
