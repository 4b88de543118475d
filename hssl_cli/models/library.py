"""Backbones from timm and torchvision by name (`model.backbone: timm:<name>` / `torchvision:<name>`):
untrained (SSL pretraining starts from scratch, or from the library's weights with `--init-from`), classifier
removed, so the model maps images to pooled features (B, feature_dim). Their state_dict keeps the library's
names, so an exported backbone loads back into the library's own model (capabilities.library_twins), and the
library's weights load into it (less the classifier: capabilities.library_classifier)."""

from __future__ import annotations

import difflib

from torch import nn

from hssl_cli.errors import RecipeError
from hssl_cli.models.capabilities import BackboneCapabilities


def library_backbone(spec: str, in_channels: int) -> nn.Module:
    library, name = spec.split(":", 1)
    build = {"timm": _timm, "torchvision": _torchvision}[library]
    return build(name, in_channels, spec)


def _unknown(spec: str, name: str, known: list[str]) -> RecipeError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return RecipeError(f"model.backbone: {spec} is not a model that {spec.split(':')[0]} builds{hint}")


def _timm(name: str, in_channels: int, spec: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise _unknown(spec, name, timm.list_models())
    try:  # num_classes=0: timm's own way to drop the classifier and keep the pooled features
        network = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    except (TypeError, ValueError, RuntimeError, AssertionError) as error:
        raise RecipeError(f"model.backbone: timm could not build {name} ({error})") from None
    network.feature_dim = network.num_features
    classifier = network.pretrained_cfg.get("classifier") or ()  # timm's name for it: "fc", "head", a tuple
    network.capabilities = BackboneCapabilities(
        spatial_map="forward_features", library_twins=("timm",),
        library_classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier))
    return network


def _torchvision(name: str, in_channels: int, spec: str) -> nn.Module:
    import torchvision
    from torchvision.models import ResNet

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise _unknown(spec, name, torchvision.models.list_models(module=torchvision.models))
    if in_channels != 3:
        raise RecipeError(f"model.backbone: torchvision's {name} reads 3-channel images and this data has "
                          f"{in_channels}; use timm:{name} (timm adapts the first layer with in_chans) if timm has it")
    extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    network = torchvision.models.get_model(name, weights=None, **extra)
    head_name, head = classifier_of(network)
    _replace(network, head_name, nn.Identity())
    network.feature_dim = head.in_features
    network.capabilities = BackboneCapabilities(spatial_map="resnet_stages" if isinstance(network, ResNet) else None,
                                                library_twins=("torchvision",), library_classifier=(head_name,))
    return network


def classifier_of(network: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer (torchvision's classifiers end in one: fc, classifier[-1], heads.head, ...)."""
    linears = [(name, module) for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise RecipeError(f"model.backbone: {type(network).__name__} has no linear classifier to remove; "
                          "hssl needs a model that ends in one")
    return linears[-1]


def _replace(network: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, module)
