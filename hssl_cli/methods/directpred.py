"""DirectPred (Tian et al. 2021) and IsoLoss (Halvagal, Laborieux, Zenke 2023).

BYOL's online/target networks, but the predictor is not learned: it is set every step from the EMA
correlation C of the online embeddings. With `loss: iso` the BYOL gradient w.r.t. the prediction is
applied to z directly (losses.iso_loss). `ema: false` drops the target network (SimSiam-style). With local
views (multi-crop) the target reads the global views only; every view's W_P z meets the target of every other
global view (base.loss_over_target_pairs), and C is still the correlation of the global views' z alone.
"""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.collectives import sum_over_ranks, world_size
from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine, iso_loss
from hssl_cli.methods.base import SSLMethod, ViewFeatures, loss_over_target_pairs, project_views
from hssl_cli.methods.byol import global_targets, make_target, target_momentum, update_target
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


class CorrelationPredictor(nn.Module):
    """p = W_P z, W_P = U diag(f(s)) U^T where C = U diag(s) U^T, f(s) = (s / max(s) + eps)^alpha (eps
    `inside`, the paper's) or (s / max(s))^alpha + eps (`outside`, the authors' code), s clamped at 0.

    C is a buffer (checkpointed as `predictor.correlation`, so a resumed run continues bit for bit). W_P is
    recomputed every `every` training calls and kept between (`predictor.weight_p`, checkpointed when every >
    1); the call count lives in a device buffer, mirrored in Python after one read, so deciding costs no host
    sync.
    """

    def __init__(self, dim: int, alpha: float, eps: float, rho: float, every: int = 1, eps_inside: bool = True):
        super().__init__()
        self.alpha, self.eps, self.rho, self.every, self.eps_inside = alpha, eps, rho, every, eps_inside
        self.register_buffer("correlation", torch.zeros(dim, dim))
        # kept between refreshes only when there are any (every > 1): then a resume needs them, bit for bit
        self.register_buffer("weight_p", torch.zeros(dim, dim), persistent=every > 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=every > 1)
        self._calls: int | None = None  # the Python mirror of `calls`, read once (after a resume: from the file)

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
        """W_P from C now (symmetric, positive definite when eps > 0), fp32."""
        with torch.autocast(self.correlation.device.type, enabled=False):
            eigenvalues, eigenvectors = torch.linalg.eigh(self.correlation)
            eigenvalues = eigenvalues.clamp_min(0)
            # an untrained C is zero: W_P is then eps^alpha I instead of a division by zero
            normalised = eigenvalues / eigenvalues.max().clamp_min(torch.finfo(eigenvalues.dtype).tiny)
            if self.eps_inside:
                scaled = (normalised + self.eps).pow(self.alpha)
            else:
                scaled = normalised.pow(self.alpha) + self.eps
            return eigenvectors @ torch.diag(scaled) @ eigenvectors.T

    # Left out of torch.compile: the Python call count would be a guard, recompiling the step at every call.
    @torch.compiler.disable
    @torch.no_grad()
    def training_weight(self) -> torch.Tensor:
        """W_P for a training step: recomputed on calls 0, every, 2 every, ..., else the kept one."""
        if self._calls is None:
            self._calls = int(self.calls)
        if self._calls % self.every == 0:
            self.weight_p.copy_(self.weight())
        self._calls += 1
        self.calls.add_(1)
        return self.weight_p

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight().to(z.dtype)


class DirectPred(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)
        self.predictor = CorrelationPredictor(recipe.model.projector[-1], config.alpha, config.eps, config.rho,
                                              config.predictor_every, config.eps_convention == "inside")
        self.target = make_target(backbone, self.projector) if config.ema else None
        self.ema_start = config.ema_start
        self.loss_name = config.loss

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        global_z, local_z = project_views(self.projector, ViewFeatures(self.backbone, views))
        if self.training:  # C from the global views' z only (as without local views); local views only meet W_P
            self.predictor.update(torch.cat(global_z))
            weight = self.predictor.training_weight()
        else:
            weight = self.predictor.weight()
        online = [z.to(weight.dtype) for z in (*global_z, *local_z)]
        targets = [target.to(weight.dtype) for target in global_targets(self.target, views, global_z)]
        if self.loss_name == "byol":  # 2 views: l(W_P z1, t2) + l(W_P z2, t1)
            return {"loss": loss_over_target_pairs([z @ weight for z in online], targets, byol_cosine)}
        with torch.no_grad():  # the BYOL value is logged too, so runs with either loss compare on one scale
            cosine = loss_over_target_pairs([z @ weight for z in online], targets, byol_cosine)
        iso = loss_over_target_pairs(online, targets, lambda z, target: iso_loss(z, target, weight))
        return {"loss": iso, "loss/cosine": cosine}

    def after_optimizer_step(self, progress: float) -> None:
        if self.target is not None:
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
