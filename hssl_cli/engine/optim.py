"""Optimisers (SGD, LARS, AdamW) and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from hssl_cli.recipe import OptimConfig


def parameter_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Split biases and normalisation weights (ndim <= 1) out when `exclude_bias_and_norm` is set:
    they get no weight decay and, under LARS, no trust-ratio scaling (as in SimCLR/BYOL)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not config.exclude_bias_and_norm:
        return [{"params": trainable, "weight_decay": config.weight_decay, "always_adapt": True}]
    return [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": config.weight_decay, "always_adapt": True},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "always_adapt": False},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.name == "lars":
        from timm.optim.lars import Lars  # a maintained LARS; timm is imported only when LARS is used

        return Lars(groups, lr=config.lr, momentum=config.momentum, trust_coeff=config.lars_trust)
    for group in groups:
        group.pop("always_adapt")
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused or None)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)


def learning_rate(step: int, total_steps: int, warmup_steps: int, config: OptimConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then a half cosine down to final_lr_fraction * lr."""
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    final = config.lr * config.final_lr_fraction
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
