"""Fine-tuning evaluation (`hssl probe --protocol finetune`): the pretrained backbone and a linear head trained end
to end on (a fraction of) the labelled train images, then scored on the unaugmented test images. This is the
semi-supervised protocol of SimCLR (Chen et al. 2020, B.5) and BYOL (Grill et al. 2020, C.2): random resized crop
and flip, Nesterov SGD, a cosine schedule, BatchNorm statistics updated, the head initialised to zero. Here the
backbone's learning rate is a fraction of the head's (`backbone_lr_scale`), so the pretrained features are adapted
rather than overwritten, and AdamW is offered for backbones that are usually tuned with it (ViTs).

The backbone is no longer frozen, so these numbers measure the pretraining as an initialisation: they are not
comparable with the frozen protocols (fast, standard, kNN)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hssl_cli.data.augment import Augmenter
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.features import extract_features, model_device
from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
from hssl_cli.evaluate.measures.linear_sgd import CROP_AND_FLIP, generator_on
from hssl_cli.evaluate.probe_data import LazyImages


class FinetunedClassifier(nn.Module):
    """The tuned copy of the backbone and its linear head: images -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images).float().flatten(1))


def finetune(backbone: nn.Module, images: Tensor | LazyImages, labels: Tensor, num_classes: int, mean: Tensor,
             std: Tensor, protocol: FinetuneProtocol, advance: Callable[[int], None] | None = None
             ) -> FinetunedClassifier:
    """A copy of `backbone` (left untouched) and a zero-initialised linear head, trained end to end on augmented
    `images` (uint8, decoded or streamed) as `protocol` says; returned in eval mode, frozen. Every draw (order,
    crops, flips) comes from one generator seeded by protocol.seed. `advance(1)` after every step."""
    from hssl_cli.methods.kernel import KernelFeatureMap

    # a kernel-regime feature map is a closed-form solution; its network kernels' weights are the kernel's, fixed
    if isinstance(backbone, KernelFeatureMap) or not any(True for _ in backbone.parameters()):
        raise HsslError("--protocol finetune: this backbone is a kernel-regime feature map (a closed-form solution "
                        "over a fixed kernel), with nothing to fine-tune; use --protocol fast or standard")
    device = model_device(backbone)
    tuned = copy.deepcopy(backbone).requires_grad_(True)
    with torch.no_grad():
        feature_dim = extract_features(backbone, images[:2], mean, std).shape[1]
    head = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)  # as SimCLR's fine-tuning head
    nn.init.zeros_(head.bias)
    model = FinetunedClassifier(tuned, head)
    batch_size = min(protocol.batch_size, len(images))
    steps_per_epoch = max(len(images) // batch_size, 1)
    optimizer, base_lrs = _optimizer(model, protocol, batch_size)
    augmenter = Augmenter(CROP_AND_FLIP, images.shape[-1], mean, std)
    generator = torch.Generator().manual_seed(protocol.seed)
    labels = labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    total = steps(len(images), protocol)
    for epoch in range(protocol.epochs):
        order = torch.randperm(len(images), generator=generator)[:steps_per_epoch * batch_size]
        for index, batch in enumerate(_batches(images, order, batch_size)):
            step = epoch * steps_per_epoch + index
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))  # lr_0 (1 + cos(pi t / T)) / 2
            views = augmenter(batch.to(device, non_blocking=True), generator_on(device, generator))
            chosen = order[index * batch_size:(index + 1) * batch_size].to(device)
            with autocast:
                loss = F.cross_entropy(model(views).float(), labels[chosen])
            if not torch.isfinite(loss):
                raise HsslError(f"--protocol finetune: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                f"{index + 1}; lower --lr (or --backbone-lr-scale)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if advance is not None:
                advance(1)
    return model.eval().requires_grad_(False)


def steps(image_count: int, protocol: FinetuneProtocol) -> int:
    """Optimiser steps fine-tuning takes on `image_count` images (a progress bar's total)."""
    return protocol.epochs * max(image_count // min(protocol.batch_size, image_count), 1)


def _optimizer(model: FinetunedClassifier, protocol: FinetuneProtocol, batch_size: int
               ) -> tuple[torch.optim.Optimizer, list[float]]:
    """Two parameter groups, head and backbone, with base learning rates lr x batch/256 and that x the scale."""
    head_lr = protocol.head_lr * batch_size / 256
    base_lrs = [head_lr, head_lr * protocol.backbone_lr_scale]
    groups = [{"params": list(model.head.parameters()), "lr": base_lrs[0]},
              {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": base_lrs[1]}]
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=protocol.weight_decay), base_lrs
    return torch.optim.SGD(groups, momentum=protocol.momentum, nesterov=True,
                           weight_decay=protocol.weight_decay), base_lrs


def _batches(images: Tensor | LazyImages, order: Tensor, batch_size: int) -> Iterator[Tensor]:
    """uint8 batches of `images` in `order`: sliced from a tensor, or decoded batch by batch when streamed."""
    if isinstance(images, LazyImages):
        yield from images[order].batches(batch_size)
        return
    for start in range(0, len(order), batch_size):
        yield images[order[start:start + batch_size]]
