"""Frozen-feature extraction: one pass of a model in eval mode over uint8 images, batched on its device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hssl_cli.data.augment import normalize
from hssl_cli.evaluate.forward_memory import images_per_pass
from hssl_cli.evaluate.probe_data import LazyImages


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer; CPU for a model that has neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    model: nn.Module, images: Tensor, mean: Tensor, std: Tensor, batch_size: int = 512,
    advance: Callable[[int], None] | None = None,
) -> Tensor:
    """Run `model` in eval mode on normalised uint8 images (N, C, H, W); return float32 (N, D).

    Batches of `batch_size` images, fewer where the memory budget asks for it (forward_memory.images_per_pass),
    are moved to the model's device, under bf16 autocast on CUDA. Outputs with more than two
    dimensions are flattened after the batch dimension. `advance(n)` is told of every batch done (a
    progress bar). The train/eval mode of every submodule is
    restored afterwards, so a partly frozen model (e.g. eval-mode BatchNorm) comes back unchanged.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"extract_features expects a non-empty (N, C, H, W) batch, got {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    # bf16 on CUDA halves the memory traffic; features are cast back to float32 for the probes.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def forward(batch: Tensor) -> Tensor:
        with autocast:
            return model(normalize(batch.to(device, non_blocking=True), mean, std))

    try:
        batch_size = images_per_pass(forward, tuple(images.shape[1:]), device, batch_size)
        chunks = []
        # streamed images decode batch by batch; a tensor is sliced
        batches = images.batches(batch_size) if isinstance(images, LazyImages) else (
            images[start : start + batch_size] for start in range(0, images.shape[0], batch_size))
        for batch in batches:
            chunks.append(forward(batch).float().flatten(1))
            if advance is not None:
                advance(batch.shape[0])
        return torch.cat(chunks)
    finally:
        for module, training in modes:
            module.training = training
