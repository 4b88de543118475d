"""Rebuild a trained method from a checkpoint alone (no recipe file needed), frozen for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hssl_cli.engine.checkpoint import Checkpoint, load_module_state
from hssl_cli.errors import CheckpointError
from hssl_cli.methods.base import SSLMethod


@dataclass
class TrainedMethod:
    method: SSLMethod         # eval mode, on its device, gradients off
    mean: torch.Tensor        # per-channel statistics of the pretraining data (preprocessing)
    std: torch.Tensor

    @property
    def in_channels(self) -> int:
        return self.mean.numel()


class Embedding(nn.Module):
    """The method's embedding of one view (`SSLMethod.embedding`) as a module, for feature extraction."""

    def __init__(self, method: SSLMethod):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.embedding(images)


def load_trained_method(checkpoint: Checkpoint, device: torch.device) -> TrainedMethod:
    """The checkpoint's method with its weights and preprocessing, frozen on `device`."""
    from hssl_cli.methods import build_method

    if "data.mean" not in checkpoint.tensors:
        raise CheckpointError(f"{checkpoint.path}: no data.mean/data.std tensors; not written by hssl pretrain")
    mean, std = checkpoint.tensors["data.mean"], checkpoint.tensors["data.std"]
    method = build_method(checkpoint.recipe, in_channels=mean.numel())
    load_module_state(method, {k: v for k, v in checkpoint.tensors.items() if not k.startswith("data.")},
                      checkpoint.path, "model")
    return TrainedMethod(method.to(device).eval().requires_grad_(False), mean.to(device), std.to(device))


def feature_model(method: SSLMethod, features: str) -> nn.Module:
    """`features`: "backbone" for f(x), "projector" for the method's embedding of one view."""
    if features == "backbone":
        return method.backbone
    if features == "projector" and method.has_embedding:
        return Embedding(method)
    raise CheckpointError(f"the {type(method).__name__} model has no {features} output; use --features backbone")
