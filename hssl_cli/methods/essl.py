"""E-SSL (Dangovski et al. 2022): rotation prediction added to SimCLR or BYOL.

Each image x of the branch's views is turned by r^k, k in {0, 1, 2, 3} quarter-turns (exact: a permutation of
pixels, data/groups.py); the shared backbone f and a head h give four logits h(f(r^k x));
L_rot = CE(h(f(r^k x)), k), averaged over the images; L = L_ssl + lambda L_rot. The views (method.essl.views)
are by default the recipe's local views, which then feed only this branch: the paper's CIFAR-10 code rotates
a third, separately augmented crop at half the image size, each in all four rotations (method.essl.rotations).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.data.groups import Group, act_on_images
from hssl_cli.data.views import Views
from hssl_cli.methods.base import random_integers
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import EsslConfig

QUARTER_TURNS = Group("C", 4)  # element k: the counter-clockwise rotation by 90 k degrees


def rotated_batch(images: torch.Tensor, rotations: str, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) images -> (r^k x, k): all: the batch in each rotation k = 0..3 in turn (4B images);
    one: each image in one rotation k drawn from `generator`."""
    if rotations == "all":
        labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
        images = images.repeat(4, 1, 1, 1)
    else:
        labels = random_integers(0, 4, len(images), generator, images.device)
    return act_on_images(images, labels, QUARTER_TURNS), labels


class RotationPredictionBranch(nn.Module):
    """The head h and the loss; the backbone is the method's own, passed in (not a submodule here)."""

    def __init__(self, feature_dim: int, config: EsslConfig):
        super().__init__()
        self.head = mlp(feature_dim, [*config.head, 4], layer_norm=True)  # h
        self.weight = config.weight
        self.views = config.views
        self.rotations = config.rotations

    def base_views(self, views: Views, keep_original: bool) -> Views:
        """The views the base loss reads: the branch's own local views are its alone, and x0 only stays where
        the base method reads it too (`keep_original`, e.g. EquiMod's branch)."""
        local = self.views != "local"
        return dataclasses.replace(views, local_views=views.local_views if local else [],
                                   local_params=views.local_params if local else [],
                                   original=views.original if keep_original else None)

    def images(self, views: Views) -> torch.Tensor:
        """The images this branch rotates: the local views, the global views or x0, in one batch."""
        chosen = {"local": views.local_views, "global": views.global_views, "original": [views.original]}[self.views]
        return torch.cat(chosen)

    def forward(self, backbone: nn.Module, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rotated, labels = rotated_batch(self.images(views), self.rotations, generator)
        logits = self.head(backbone(rotated)).float()
        loss = F.cross_entropy(logits, labels)  # L_rot = -mean log softmax(h(f(r^k x)))_k
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss/rotation": loss, "essl/accuracy": accuracy}

    def add_to(self, losses: dict[str, torch.Tensor], backbone: nn.Module, views: Views,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """L = L_ssl + lambda L_rot, every term reported; the base's loss is loss/invariance, unless the base
        already reports that name (EquiMod's branch: its invariance term)."""
        terms = self(backbone, views, generator)
        return {"loss/invariance": losses["loss"], **losses, **terms,
                "loss": losses["loss"] + self.weight * terms["loss/rotation"]}
