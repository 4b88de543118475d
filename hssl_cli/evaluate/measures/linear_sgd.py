"""The papers' linear evaluation (`hssl probe --protocol standard`): a linear layer trained by SGD on the
frozen backbone's features of augmented train images (random resized crop and horizontal flip, drawn anew
every epoch), cosine learning-rate schedule, scored on the features of the unaugmented test images.
SimCLR, BYOL and solo-learn evaluate this way (SGD with Nesterov momentum 0.9, ~100 epochs, batch 256);
it costs a backbone pass per train image per epoch, where the fast protocol costs one pass in all."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hssl_cli.data.augment import Augmenter, normalize
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.forward_memory import images_per_pass
from hssl_cli.evaluate.measures.finetune_protocol import check_training_ranges
from hssl_cli.recipe import AugmentConfig

# Random resized crop and flip only, as in the papers' linear evaluation (no colour jitter, grey or blur)
CROP_AND_FLIP = AugmentConfig.model_validate({
    "crop_scale": (0.08, 1.0), "flip": 0.5, "grayscale": 0.0,
    "color_jitter": {"p": 0.0}, "blur": {"p": 0.0},
})


@dataclass(frozen=True)
class SgdProtocol:
    epochs: int = 100
    lr: float = 0.1          # for batch 256; scaled linearly with the batch (Goyal et al.)
    batch_size: int = 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        """The ranges `hssl probe` (--epochs, --batch-size, --lr, --weight-decay) and a suite's probe accept."""
        check_training_ranges(self.epochs, self.batch_size)
        if not (0 < self.lr <= 100 and 0 <= self.weight_decay <= 10):
            raise HsslError(f"--lr {self.lr:g} / --weight-decay {self.weight_decay:g}: give 0 < lr <= 100 and "
                            "0 <= weight decay <= 10")

    def describe(self, image_count: int | None = None) -> str:
        """The settings in a line; with `image_count`, the batch actually used (never more than the images)."""
        batch = self.batch_size if image_count is None else min(self.batch_size, image_count)
        return (f"SGD (Nesterov 0.9) {self.epochs} epochs, batch {batch}, lr {self.lr:g} x batch/256, "
                f"cosine, wd {self.weight_decay:g}, crop+flip")


def train_linear_sgd(backbone: nn.Module, images: Tensor, labels: Tensor, num_classes: int, mean: Tensor,
                     std: Tensor, protocol: SgdProtocol, advance: Callable[[int], None] | None = None) -> nn.Linear:
    """A linear classifier on `backbone`'s frozen features of augmented `images` (uint8, CPU), trained as
    `protocol` says; the backbone stays in eval mode (BatchNorm uses its running statistics). Every draw
    (order, crops, flips) comes from one generator seeded by protocol.seed."""
    device = next(backbone.parameters()).device
    image_size = images.shape[-1]
    augmenter = Augmenter(CROP_AND_FLIP, image_size, mean, std)
    generator = torch.Generator().manual_seed(protocol.seed)
    with torch.no_grad():
        feature_dim = extract_features(backbone, images[:2], mean, std).shape[1]
    classifier = nn.Linear(feature_dim, num_classes).to(device)
    torch.manual_seed(protocol.seed)
    classifier.reset_parameters()
    batch_size = min(protocol.batch_size, len(images))
    base_lr = protocol.lr * batch_size / 256  # scaled with the batch actually used
    optimizer = torch.optim.SGD(classifier.parameters(), lr=base_lr, momentum=protocol.momentum, nesterov=True,
                                weight_decay=protocol.weight_decay)
    steps_per_epoch = max(len(images) // batch_size, 1)
    total = protocol.epochs * steps_per_epoch
    labels = labels.to(device)
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    # views have the images' size: one normalised image measures what one view costs
    per_pass = images_per_pass(lambda batch: backbone(normalize(batch, mean, std)),
                               (images.shape[1], image_size, image_size), device, batch_size)
    try:
        for epoch in range(protocol.epochs):
            order = torch.randperm(len(images), generator=generator)
            for index in range(steps_per_epoch):
                step = epoch * steps_per_epoch + index
                for group in optimizer.param_groups:  # lr_t = lr_0 (1 + cos(pi t / T)) / 2
                    group["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
                chosen = order[index * batch_size:(index + 1) * batch_size]
                batch = images[chosen].to(device)
                views = augmenter(batch, generator_on(device, generator))
                with torch.no_grad():  # per_pass views at a time: the memory budget's, exact in eval mode
                    features = torch.cat([backbone(chunk).float().flatten(1) for chunk in views.split(per_pass)])
                loss = F.cross_entropy(classifier(features), labels[chosen.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if advance is not None:
                advance(1)
    finally:
        for module, training in modes:
            module.training = training
    return classifier.eval().requires_grad_(False)


def generator_on(device: torch.device, source: torch.Generator) -> torch.Generator:
    """The CPU generator itself, or a device generator seeded from it (augmentation draws on the device)."""
    if device.type == "cpu":
        return source
    seed = int(torch.randint(0, 2**62, (1,), generator=source))
    return torch.Generator(device=device).manual_seed(seed)
