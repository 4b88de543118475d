"""Every backbone declares what it has (models/capabilities.py): lifted fibres over a group, scale levels, a
spatial map, library twins. The declaration matches what the backbone does, and a method or check that needs
a capability the backbone lacks refuses it by name."""

import copy

import pytest
import torch
from torch import nn

from hssl_cli.data.groups import Group
from hssl_cli.errors import RecipeError
from hssl_cli.methods.equivariant_heads import EquivariantPretext, InvariantContrastive
from hssl_cli.methods.hssl import HSSL
from hssl_cli.methods.kernel import KernelFeatureMap
from hssl_cli.models.backbones import build_backbone
from hssl_cli.models.capabilities import BackboneCapabilities, capabilities_of
from hssl_cli.models.kernels import RBFKernel
from hssl_cli.models.spatial import feature_map
from hssl_cli.recipe import ModelConfig, parse_recipe

C4 = Group("C", 4)
E2_CONVNET = {"backbone": "e2_convnet", "group": {"name": "C", "order": 4}, "widths": [2, 3], "projector": [8]}


def _model(**fields) -> ModelConfig:
    return ModelConfig(projector=[8], **fields)


E2_MODEL = "{backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], projector: [8]}"

VIT = {"patch_size": 4, "width": 8, "depth": 1, "heads": 2}
# kind: (how to build it, (channels, side) of its test images, its declaration)
BACKBONES = {
    "small_convnet": (lambda: build_backbone("small_convnet", 1), (1, 16),
                      BackboneCapabilities(spatial_map="features")),
    "resnet18_cifar": (lambda: build_backbone("resnet18_cifar", 1), (1, 16),
                       BackboneCapabilities(spatial_map="resnet_stages", library_twins=("torchvision", "timm"),
                                            library_classifier=("fc",))),
    "timm CNN": (lambda: build_backbone("timm:test_resnet", 1), (1, 32),
                 BackboneCapabilities(spatial_map="forward_features", library_twins=("timm",),
                                      library_classifier=("fc",))),
    "torchvision ResNet": (lambda: build_backbone("torchvision:resnet18", 3), (3, 32),
                           BackboneCapabilities(spatial_map="resnet_stages", library_twins=("torchvision",),
                                                library_classifier=("fc",))),
    "torchvision without a map": (lambda: build_backbone("torchvision:mobilenet_v3_small", 3), (3, 32),
                                  BackboneCapabilities(library_twins=("torchvision",),
                                                       library_classifier=("classifier.3",))),
    "e2_convnet": (lambda: build_backbone(ModelConfig(**E2_CONVNET), 1), (1, 16),
                   BackboneCapabilities(group=C4, equivariant=True, spatial_map="layer_outputs")),
    "e2_convnet plain twin": (lambda: build_backbone(ModelConfig(**E2_CONVNET), 1, plain=True), (1, 16),
                              BackboneCapabilities(group=C4, equivariant=False, spatial_map="layer_outputs")),
    "scale lifting": (lambda: build_backbone(_model(backbone="small_convnet", scales={"levels": 2}), 1), (1, 16),
                      BackboneCapabilities(scale_levels=2, equivariant=True, spatial_map="full_size_level")),
    "scale lifting plain twin": (
        lambda: build_backbone(_model(backbone="small_convnet", scales={"levels": 3}), 1, plain=True), (1, 16),
        BackboneCapabilities(scale_levels=3, spatial_map="full_size_level")),
    "scale lifting without a map": (
        lambda: build_backbone(_model(backbone="torchvision:mobilenet_v3_small", scales={"levels": 2}), 3), (3, 32),
        BackboneCapabilities(scale_levels=2, equivariant=True)),
    "vit": (lambda: build_backbone(_model(backbone="vit", vit=VIT), 1, image_size=16), (1, 16),
            BackboneCapabilities(spatial_map="token_grid", library_twins=("timm",),
                                 library_classifier=("head",), position_embedding=True)),
    "vit without position embeddings": (
        lambda: build_backbone(_model(backbone="vit", vit=VIT | {"position_embedding": "none"}), 1, image_size=16),
        (1, 16), BackboneCapabilities(spatial_map="token_grid", library_twins=("timm",),
                                           library_classifier=("head",))),
    "kernel feature map": (lambda: KernelFeatureMap(RBFKernel(16, 1.0), (1, 4, 4), 0, 4, 2, 8), (1, 4),
                           BackboneCapabilities()),
}


@pytest.mark.parametrize("kind", BACKBONES)
def test_each_backbone_declares_what_it_has_and_has_what_it_declares(kind):
    build, (channels, side), declared = BACKBONES[kind]
    torch.manual_seed(0)
    backbone = build()
    capabilities = capabilities_of(backbone)
    assert capabilities == declared
    assert capabilities_of(copy.deepcopy(backbone)) == declared  # BYOL's target, map_size's probe copy
    backbone.eval()
    images = torch.randn(2, channels, side, side)
    with torch.no_grad():
        if capabilities.spatial_map is not None:
            assert feature_map(backbone, images).ndim == 4
        else:
            with pytest.raises(RecipeError, match="gives no spatial map"):
                feature_map(backbone, images)
        if capabilities.group is not None:
            assert backbone.lifted(images).shape == (2, capabilities.group.size, backbone.feature_dim)
        elif capabilities.scale_levels is not None:
            assert backbone.lifted(images).shape == (2, capabilities.scale_levels, backbone.feature_dim)
    assert capabilities.lifted == (capabilities.group is not None or capabilities.scale_levels is not None)
    removed = tuple(f"{name}." for name in capabilities.library_classifier)  # --init-from leaves these out
    assert not any(key.startswith(removed) for key in backbone.state_dict())


class Undeclared(nn.Module):
    feature_dim = 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4]


class PooledOnly(Undeclared):
    """A backbone that declares none of the capabilities: pooled features only."""

    capabilities = BackboneCapabilities()


def test_a_backbone_without_a_declaration_is_a_bug_named_by_its_type():
    with pytest.raises(TypeError, match="Undeclared declares no capabilities"):
        capabilities_of(Undeclared())


def test_scale_fibres_on_a_backbone_without_levels_are_refused_by_name():
    recipe = parse_recipe("model: {backbone: small_convnet, scales: {levels: 2}, projector: [8]}\n"
                          "method: {name: hssl, fibres: scales}\n", "x.yaml")
    with pytest.raises(RecipeError, match="method.fibres: scales reads scale levels.*set model.scales"):
        HSSL(PooledOnly(), recipe, in_channels=1)


def test_position_fibres_on_a_backbone_without_a_map_are_refused_by_name():
    recipe = parse_recipe("model: {backbone: small_convnet, projector: [8]}\nmethod: {name: hssl, fibres: positions}\n",
                          "x.yaml")
    with pytest.raises(RecipeError, match="PooledOnly gives no spatial map"):
        HSSL(PooledOnly(), recipe, in_channels=1)


@pytest.mark.parametrize(("method", "cls"), [("equivariant_pretext", EquivariantPretext),
                                             ("invariant_contrastive", InvariantContrastive)])
def test_group_methods_on_a_backbone_without_a_group_are_refused_by_name(method, cls):
    recipe = parse_recipe(f"model: {E2_MODEL}\nmethod: {{name: {method}}}\n", "x.yaml")
    with pytest.raises(RecipeError, match=f"method {method} reads the fibres of a group.*e2_\\* backbone"):
        cls(PooledOnly(), recipe)
