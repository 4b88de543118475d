"""BYOL (Grill et al. 2020): online f, g, q; target = EMA of f, g; symmetrised 2 - 2 cos.

The target network's pieces (make_target, target_momentum, update_target) are shared with DirectPred.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hssl_cli.losses import byol_cosine
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.equimod import EquiModBranch, backbone_features
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import BYOLConfig, ModelConfig


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
    for target_buffer, online_buffer in zip(target.buffers(), online_buffers, strict=True):
        target_buffer.copy_(online_buffer)


class BYOL(SSLMethod):
    def __init__(self, backbone: nn.Module, model: ModelConfig, config: BYOLConfig,
                 equimod: EquiModBranch | None = None):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, model.projector)
        self.predictor = mlp(model.projector[-1], config.predictor)
        self.target = make_target(backbone, self.projector)
        self.ema_start = config.ema_start
        self.equimod = equimod
        self.needs_original = equimod is not None

    def forward(self, views: list[torch.Tensor], augmentation_params=None, original=None) -> dict[str, torch.Tensor]:
        features, original_features = backbone_features(self.backbone, views, original)
        p1, p2 = self.predictor(self.projector(torch.cat(features))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target["projector"](self.target["backbone"](torch.cat(views))).chunk(2)
        loss = byol_cosine(p1, t2) + byol_cosine(p2, t1)
        if self.equimod is None:
            return {"loss": loss}
        return self.equimod.add_to(loss, features, original_features, augmentation_params)

    def after_optimizer_step(self, progress: float) -> None:
        update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
