"""The optional branches SimCLR and BYOL share (method.equimod, method.essl): which views the base loss reads,
and the branches' terms added to it, EquiMod's first, then E-SSL's."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.methods.base import ViewFeatures
from hssl_cli.methods.equimod import EquiModBranch
from hssl_cli.methods.essl import RotationPredictionBranch


def base_views(views: Views, equimod: EquiModBranch | None, essl: RotationPredictionBranch | None) -> Views:
    """The views the base method's loss reads: all of them, less the views E-SSL keeps for itself."""
    return views if essl is None else essl.base_views(views, equimod is not None)


def with_branches(losses: dict[str, torch.Tensor], equimod: EquiModBranch | None,
                  essl: RotationPredictionBranch | None, backbone: nn.Module, features: ViewFeatures, views: Views,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The base method's `losses` with each branch's term added (L = L_ssl + EquiMod's + lambda L_rot)."""
    if equimod is not None:
        losses = equimod.add_to(losses["loss"], features.global_features, features.original, views.global_params,
                                generator)
    if essl is not None:
        losses = essl.add_to(losses, backbone, views, generator)
    return losses
