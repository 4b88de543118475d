"""Where a command runs and how: the device named by --device, the seeded generators every random draw
comes from, and the run's choices that follow from the device (bf16 autocast, torch.compile). Training
and the evaluation commands share these; none of them needs the training loop."""

from __future__ import annotations

import torch

from hssl_cli.errors import HsslError
from hssl_cli.recipe import TrainConfig


def resolve_device(name: str) -> torch.device:
    """`--device`: cpu, cuda, or auto (cuda when one is visible)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HsslError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return torch.device(name)


def seeded_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch or step, ...): resuming needs no RNG state."""
    generator = torch.Generator(device=device)
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    generator.manual_seed(seed)
    return generator


def uses_bf16(train: TrainConfig, device: torch.device) -> bool:
    """train.precision: bf16 autocast when asked, or by default (auto) on CUDA."""
    return train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")


def uses_compile(train: TrainConfig, device: torch.device) -> bool:
    """train.compile: torch.compile the step when asked, or by default (auto) on CUDA."""
    return train.compile is True or (train.compile == "auto" and device.type == "cuda")
