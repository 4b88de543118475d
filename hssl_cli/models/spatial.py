"""Spatial feature maps of convolutional backbones, before pooling: where translation H-SSL finds its
fibres. A convolution commutes with translations, so the feature at position p of T_s x is the feature
at p - s/stride of x wherever the shift is a multiple of the map's stride and the receptive field stays
inside the image (zero padding breaks it at the borders)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hssl_cli.errors import RecipeError
from hssl_cli.models.capabilities import capabilities_of


def feature_map(backbone: nn.Module, images: torch.Tensor, layer: str = "last") -> torch.Tensor:
    """The map (B, C, h, w) of `layer` ("last": the last map before pooling; layer3/layer4: those stages of a
    ResNet), read where the backbone's capabilities say (spatial_map). Equivariant backbones give (B, C |G|, h, w),
    channels field-major (C fields of |G| each)."""
    source = capabilities_of(backbone).spatial_map
    if source == "full_size_level":  # a multi-scale lifting: its full-size level's map
        return feature_map(backbone.network(0), images, layer)
    if source == "resnet_stages":
        return _resnet_map(backbone, images, "layer4" if layer == "last" else layer)
    if source == "token_grid":
        from hssl_cli.models.vit import token_grid

        return token_grid(backbone, images, -1 if layer == "last" else _block_index(backbone, layer))
    if layer != "last":
        raise RecipeError(f"method.fibres_from: {layer} names a ResNet stage or a vit block; "
                          f"{type(backbone).__name__} has only its last map (fibres_from: last)")
    if source == "features":
        return backbone.features(images)
    if source == "layer_outputs":
        return backbone.layer_outputs(images)[-1][1]
    if source == "forward_features":  # timm: the unpooled map of a CNN; a transformer's tokens are no map
        maps = backbone.forward_features(images)
        if maps.ndim == 4:
            return maps
    raise RecipeError(f"model.backbone: {type(backbone).__name__} gives no spatial map to take position fibres from; "
                      "use small_convnet, resnet18_cifar, vit, an e2_* backbone or a timm CNN")


def layers_after_map(backbone: nn.Module, layer: str = "last") -> list[nn.Module]:
    """The layers between `layer`'s map and the pooled features: a loss on the map gives them no gradient (a
    ResNet's layer4 after layer3; a vit's later blocks and final norm)."""
    source = capabilities_of(backbone).spatial_map
    if source == "resnet_stages" and layer == "layer3":
        return [backbone.layer4]
    if source == "token_grid":
        from hssl_cli.models.vit import after_block

        return after_block(backbone, -1 if layer == "last" else _block_index(backbone, layer))
    return []


def _block_index(network: nn.Module, layer: str) -> int:
    index = int(layer.removeprefix("block")) if layer.startswith("block") and layer[5:].isdigit() else None
    if index is None or index >= len(network.blocks):
        raise RecipeError(f"method.fibres_from: {layer} is not a block of this vit; use last or block0 .. "
                          f"block{len(network.blocks) - 1}")
    return index


def _resnet_map(network: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    maps = network.maxpool(network.relu(network.bn1(network.conv1(images))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        maps = getattr(network, name)(maps)
        if name == layer:
            return maps
    raise RecipeError(f"method.fibres_from: {layer} is not a stage of ResNet; use layer3, layer4 or last")


def map_size(backbone: nn.Module, channels: int, image_size: int, layer: str = "last") -> tuple[int, int, int]:
    """(C, h, w) of the map for images of this size: one eval-mode forward of a blank image, on a float32 CPU
    copy (escnn shares its sampled bases between models, which may sit on another device or dtype)."""
    probe = copy.deepcopy(backbone).to("cpu", torch.float32).eval()
    with torch.no_grad():
        maps = feature_map(probe, torch.zeros(1, channels, image_size, image_size), layer)
    return tuple(maps.shape[1:])
