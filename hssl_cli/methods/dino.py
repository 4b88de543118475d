"""DINO (Caron et al. 2021): self-distillation with no labels. A student f, head g_s (MLP, L2 normalisation,
weight-normalised prototypes: models/heads.py DINOHead) and a teacher g_t, the EMA of the student (checkpoint
prefix `target.`, BYOL's make_target and update_target). The teacher sees the global views, the student every
view (multi-crop); L = mean over pairs (teacher view i, student view v != i) of H(P_t, P_s) (losses.py
dino_cross_entropy). The teacher's output is centred by c, an EMA of its batch mean over every rank, and
sharpened by tau_t, warmed up linearly over the first epochs.

c, tau_t (`teacher_output.`) and whether the prototypes learn (`projector.last_layer_trainable`) are buffers set
from the training progress after each optimiser step: a checkpoint holds them, so a resumed run continues bit
for bit, and reading them costs no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.collectives import sum_over_ranks, world_size
from hssl_cli.data.views import Views
from hssl_cli.losses import dino_cross_entropy
from hssl_cli.methods.base import SSLMethod, ViewFeatures
from hssl_cli.methods.byol import make_target, target_momentum, update_target
from hssl_cli.models.heads import DINOHead
from hssl_cli.recipe import Recipe


def teacher_temperature(epoch: float, warmup_temperature: float, temperature: float, warmup_epochs: float) -> float:
    # tau_t(e) = tau_w + (tau - tau_w) min(e / E_w, 1): linear warm-up over E_w epochs, then constant
    if epoch >= warmup_epochs:
        return temperature
    return warmup_temperature + (temperature - warmup_temperature) * epoch / warmup_epochs


@torch.no_grad()
def updated_centre(centre: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean of the teacher's outputs (rows of every view, on every rank), in c's dtype."""
    rows = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(centre.dtype)
    batch_mean = sum_over_ranks(rows.sum(dim=0)) / (len(rows) * world_size())
    return centre.lerp(batch_mean, 1 - momentum)


class TeacherOutput(nn.Module):
    """How the teacher's output becomes the target: its centre c (K,) and temperature tau_t, both buffers."""

    def __init__(self, prototypes: int):
        super().__init__()
        self.register_buffer("centre", torch.zeros(prototypes))
        self.register_buffer("temperature", torch.ones(()))  # set from the epoch (DINO.after_epochs)


class DINO(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        self.projector = DINOHead(backbone.feature_dim, recipe.model.projector, config.prototypes,
                                  normalised=config.norm_last_layer, batchnorm=config.head_batchnorm)
        self.teacher_output = TeacherOutput(config.prototypes)
        self.student_temperature, self.centre_momentum = config.student_temperature, config.centre_momentum
        self.temperatures = (config.warmup_teacher_temperature, config.teacher_temperature,
                             config.warmup_teacher_temperature_epochs)
        self.ema_start, self.freeze_last_layer, self.epochs = config.ema_start, config.freeze_last_layer, \
            recipe.train.epochs
        self.after_epochs(0.0)
        self.target = make_target(backbone, self.projector)  # a copy of the student as it starts, its gate included

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        features = ViewFeatures(self.backbone, views)
        every_view = [*features.global_features, *features.local_features]  # the global views first
        student = self.projector(torch.cat(every_view)).unflatten(0, (len(every_view), -1))  # g_s(f(x_v)): (V, B, K)
        with torch.no_grad():  # the teacher: the global views only
            teacher = self.target["projector"](self.target["backbone"](torch.cat(views.global_views)))
            teacher = teacher.unflatten(0, (len(views.global_views), -1))  # g_t(f_t(x_i)): (G, B, K)
        centre, temperature = self.teacher_output.centre, self.teacher_output.temperature
        loss = dino_cross_entropy(student, teacher, centre, self.student_temperature, temperature)
        if self.training:  # after the loss, as in the paper: this step's target used the previous centre
            centre.copy_(updated_centre(centre, teacher, self.centre_momentum))
        return {"loss": loss}

    def after_epochs(self, epoch: float) -> None:
        """Set what depends on the (fractional) epoch reached: tau_t, and whether the prototypes learn."""
        self.teacher_output.temperature.fill_(teacher_temperature(epoch, *self.temperatures))
        self.projector.last_layer_trainable.fill_(float(epoch >= self.freeze_last_layer))

    def after_optimizer_step(self, progress: float) -> None:
        update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
        self.after_epochs(progress * self.epochs)
