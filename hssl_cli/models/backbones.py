"""Feature extractors f: image batch (B, C, H, W) -> features (B, feature_dim)."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.models.capabilities import BackboneCapabilities
from hssl_cli.recipe import ModelConfig, ViTConfig


def resnet18_cifar(in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool."""
    from torchvision.models import resnet18

    network = resnet18()
    network.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    network.maxpool = nn.Identity()
    network.fc = nn.Identity()
    network.feature_dim = 512
    # its tensors carry torchvision's (and timm's) ResNet-18 names: hssl export writes them for either library
    network.capabilities = BackboneCapabilities(spatial_map="resnet_stages", library_twins=("torchvision", "timm"),
                                                library_classifier=("fc",))
    return network


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU stages (stride 2 after the first), global average pool; for quick CPU runs."""

    capabilities = BackboneCapabilities(spatial_map="features")

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        layers, previous = [], in_channels
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = previous

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images)).flatten(1)


BACKBONES = {"resnet18_cifar": resnet18_cifar, "small_convnet": SmallConvNet}


def build_backbone(model: ModelConfig | str, in_channels: int, plain: bool = False,
                   image_size: int | None = None) -> nn.Module:
    """The recipe's backbone (`model`, or just a plain backbone's name); it exposes `feature_dim` and
    `capabilities` (models/capabilities.py).
    timm:<name> and torchvision:<name> come from those libraries (models/library.py); vit is built for
    `image_size` (the recipe's data.image_size), sized by model.vit (models/vit.py).

    e2_* backbones (escnn, imported only for them) need model.group; `plain` builds their
    structure-removed twin (same layout, ordinary layers, |G| pseudo-fibres). model.scales wraps a plain CNN
    in a multi-scale lifting; `plain` then builds its twin (unshared copies on the un-scaled image).
    """
    name = model if isinstance(model, str) else model.backbone
    scales = None if isinstance(model, str) else model.scales
    if scales is not None:  # a multi-scale lifting of the plain CNN (models/scale_lifted.py)
        from hssl_cli.models.scale_lifted import ScaleLiftedBackbone

        return ScaleLiftedBackbone(build_backbone(name, in_channels), scales.levels, plain=plain)
    if name in BACKBONES:
        return BACKBONES[name](in_channels=in_channels)
    if name == "vit":
        from hssl_cli.models.vit import vision_transformer

        if image_size is None:
            raise ValueError("backbone 'vit' is built for an image size; pass image_size")
        return vision_transformer(ViTConfig() if isinstance(model, str) else model.vit or ViTConfig(),
                                  in_channels, image_size)
    if name.startswith(("timm:", "torchvision:")):
        from hssl_cli.models.library import library_backbone

        return library_backbone(name, in_channels)
    if isinstance(model, str) or model.group is None:
        raise ValueError(f"backbone '{name}' is equivariant and needs model.group; pass the ModelConfig")
    from hssl_cli.data.groups import Group
    from hssl_cli.models.equivariant import build_equivariant_backbone

    group = Group(model.group.name, model.group.order)
    return build_equivariant_backbone(name, group, in_channels, model.widths, plain=plain)
