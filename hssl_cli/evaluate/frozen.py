"""Rebuild a frozen feature extractor from a checkpoint alone (no recipe file needed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hssl_cli.engine.checkpoint import Checkpoint, load_module_state
from hssl_cli.errors import CheckpointError


@dataclass
class FrozenModel:
    model: nn.Module          # eval mode, on its device, gradients off
    mean: torch.Tensor        # per-channel statistics of the pretraining data (preprocessing)
    std: torch.Tensor
    in_channels: int


def load_frozen(checkpoint: Checkpoint, device: torch.device, features: str = "backbone") -> FrozenModel:
    """`features`: "backbone" for f(x), "projector" for g(f(x))."""
    from hssl_cli.methods import build_method

    if "data.mean" not in checkpoint.tensors:
        raise CheckpointError(f"{checkpoint.path}: no data.mean/data.std tensors; not written by hssl pretrain")
    mean, std = checkpoint.tensors["data.mean"], checkpoint.tensors["data.std"]
    method = build_method(checkpoint.recipe, in_channels=mean.numel())
    load_module_state(method, {k: v for k, v in checkpoint.tensors.items() if not k.startswith("data.")},
                      checkpoint.path, "model")
    if features == "backbone":
        model = method.backbone
    elif features == "projector" and hasattr(method, "projector"):
        model = nn.Sequential(method.backbone, method.projector)
    else:
        raise CheckpointError(f"{checkpoint.path}: the {checkpoint.recipe.method.name} model has no {features} "
                              "output; use --features backbone")
    model = model.to(device).eval().requires_grad_(False)
    return FrozenModel(model, mean.to(device), std.to(device), mean.numel())
