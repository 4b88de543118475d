"""Python access to trained checkpoints, for code outside hssl:

    import hssl_cli
    backbone = hssl_cli.load_backbone("checkpoints/quickstart/<run>/last.safetensors")  # f: images -> features

Images go in as float tensors normalised with the checkpoint's statistics (`load_method(...).mean/.std`,
per channel, on [0, 1] pixel values), exactly as `hssl probe` feeds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.evaluate.opening import TrainedMethod, load_trained_method


def load_method(path: str | Path, device: str | torch.device = "cpu") -> TrainedMethod:
    """The whole trained method (backbone and heads, eval mode, frozen) and its preprocessing statistics."""
    return load_trained_method(load_checkpoint(path), torch.device(device))


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained backbone f alone, eval mode, frozen: (B, C, H, W) normalised images -> (B, feature_dim)."""
    return load_method(path, device).method.backbone
