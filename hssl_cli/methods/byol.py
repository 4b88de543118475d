"""BYOL (Grill et al. 2020): online f, g, q; target = EMA of f, g; symmetrised 2 - 2 cos."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hssl_cli.losses import byol_cosine
from hssl_cli.methods.base import SSLMethod
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import BYOLConfig, ModelConfig


class BYOL(SSLMethod):
    def __init__(self, backbone: nn.Module, model: ModelConfig, config: BYOLConfig):
        super().__init__(backbone)
        self.projector = mlp(backbone.feature_dim, model.projector)
        self.predictor = mlp(model.projector[-1], config.predictor)
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)
        self.ema_start = config.ema_start

    def forward(self, views: list[torch.Tensor], augmentation_params=None, original=None) -> dict[str, torch.Tensor]:
        both = torch.cat(views)
        p1, p2 = self.predictor(self.projector(self.backbone(both))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target["projector"](self.target["backbone"](both)).chunk(2)
        return {"loss": byol_cosine(p1, t2) + byol_cosine(p2, t1)}

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        # tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2; target <- tau target + (1 - tau) online
        tau = 1 - (1 - self.ema_start) * (math.cos(math.pi * progress) + 1) / 2
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = list(self.target.parameters())
        torch._foreach_lerp_(target, online, 1 - tau)
        online_buffers = [*self.backbone.buffers(), *self.projector.buffers()]
        for target_buffer, online_buffer in zip(self.target.buffers(), online_buffers, strict=True):
            target_buffer.copy_(online_buffer)
