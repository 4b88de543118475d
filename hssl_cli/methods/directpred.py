"""DirectPred (Tian et al. 2021) and IsoLoss (Halvagal, Laborieux, Zenke 2023).

BYOL's online/target networks, but the predictor is not learned: it is set every step from the EMA
correlation C of the online embeddings. With `loss: iso` the BYOL gradient w.r.t. the prediction is
applied to z directly (losses.iso_loss). `ema: false` drops the target network (SimSiam-style).
"""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.collectives import sum_over_ranks, world_size
from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine, iso_loss
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.byol import make_target, target_momentum, update_target
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


class CorrelationPredictor(nn.Module):
    """p = W_P z, W_P = U diag(s^alpha) U^T where C = U diag(s) U^T, s <- clamp(s, 0) / max(s) + eps.

    C is a buffer (checkpointed as `predictor.correlation`, so a resumed run continues bit for bit);
    W_P is derived from it on every call.
    """

    def __init__(self, dim: int, alpha: float, eps: float, rho: float):
        super().__init__()
        self.alpha, self.eps, self.rho = alpha, eps, rho
        self.register_buffer("correlation", torch.zeros(dim, dim))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        # C <- rho C + (1 - rho) z_n^T z_n, z_n = sg(z) / sqrt(B): uncentred, in fp32 even under autocast
        with torch.autocast(z.device.type, enabled=False):
            z = z.detach().to(self.correlation.dtype)  # fp32 (the buffer's dtype) even under bf16 autocast
            # over the global batch: every rank must hold the same C, hence the same W_P
            batch_correlation = sum_over_ranks(z.T @ z)
            self.correlation.lerp_(batch_correlation / (z.shape[0] * world_size()), 1 - self.rho)

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """W_P (symmetric, positive definite when eps > 0), fp32."""
        with torch.autocast(self.correlation.device.type, enabled=False):
            eigenvalues, eigenvectors = torch.linalg.eigh(self.correlation)
            eigenvalues = eigenvalues.clamp_min(0)
            # an untrained C is zero: W_P is then eps^alpha I instead of a division by zero
            eigenvalues = eigenvalues / eigenvalues.max().clamp_min(torch.finfo(eigenvalues.dtype).tiny) + self.eps
            return eigenvectors @ torch.diag(eigenvalues.pow(self.alpha)) @ eigenvectors.T

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight().to(z.dtype)


class DirectPred(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.predictor = CorrelationPredictor(recipe.model.projector[-1], config.alpha, config.eps, config.rho)
        self.target = make_target(backbone, self.projector) if config.ema else None
        self.ema_start = config.ema_start
        self.loss_name = config.loss

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        both = torch.cat(views.global_views)
        z = self.projector(self.backbone(both))
        if self.training:
            self.predictor.update(z)
        weight = self.predictor.weight()
        with torch.no_grad():
            targets = z.detach() if self.target is None else self.target["projector"](self.target["backbone"](both))
        z1, z2 = z.to(weight.dtype).chunk(2)
        t1, t2 = targets.to(weight.dtype).chunk(2)
        if self.loss_name == "byol":
            return {"loss": byol_cosine(z1 @ weight, t2) + byol_cosine(z2 @ weight, t1)}
        with torch.no_grad():  # the BYOL value is logged too, so runs with either loss compare on one scale
            cosine = byol_cosine(z1 @ weight, t2) + byol_cosine(z2 @ weight, t1)
        return {"loss": iso_loss(z1, t2, weight) + iso_loss(z2, t1, weight), "loss/cosine": cosine}

    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
