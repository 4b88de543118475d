"""`hssl export`: a checkpoint's backbone as a plain .safetensors state_dict for code outside hssl.

plain: the backbone's own state_dict (keys without `backbone.`), for `build_backbone(model)` or
`hssl_cli.load_backbone`; torchvision / timm: for resnet18_cifar the same tensors, whose names are
those of torchvision's and timm's ResNet-18, so `load_state_dict(strict=True)` takes them once the
model has the CIFAR stem (a 3x3 stride-1 conv1, no max-pool) and no classifier; for a timm:<name> or
torchvision:<name> backbone the library's own model without its classifier; for vit timm's VisionTransformer
with the arguments the file names. The file's metadata holds the architecture, how to build it, and the
preprocessing statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

from hssl_cli.errors import HsslError
from hssl_cli.recipe import ViTConfig

FORMATS = ("plain", "torchvision", "timm")
CIFAR_STEM = {
    "torchvision": "m = torchvision.models.resnet18(); m.conv1 = torch.nn.Conv2d({c}, 64, 3, 1, 1, bias=False); "
                   "m.maxpool = torch.nn.Identity(); m.fc = torch.nn.Identity()",
    "timm": "m = timm.create_model('resnet18', num_classes=0); m.conv1 = torch.nn.Conv2d({c}, 64, 3, 1, 1, "
            "bias=False); m.maxpool = torch.nn.Identity()",
}


def export_backbone(checkpoint_path: Path, out: Path, format: str = "plain", verify: bool = True) -> dict:
    import torch

    from hssl_cli.evaluate.opening import open_for_evaluation
    from hssl_cli.files import save_safetensors_atomically
    from hssl_cli.models.capabilities import capabilities_of

    if format not in FORMATS:
        raise HsslError(f"--format {format}: one of {', '.join(FORMATS)}")
    opened = open_for_evaluation(checkpoint_path, torch.device("cpu"), verify=verify)  # what is exported loads
    checkpoint = opened.checkpoint
    backbone = checkpoint.recipe.model.backbone
    network = opened.method.backbone
    capabilities = capabilities_of(network)
    if format != "plain" and capabilities.scale_levels is not None:
        raise HsslError(f"--format {format}: this backbone is a multi-scale lifting of {backbone} (model.scales), "
                        "which no library model has; use --format plain (load it with hssl_cli.load_backbone)")
    if format != "plain" and format not in capabilities.library_twins:
        twins = "resnet18_cifar, vit" if format == "timm" else "resnet18_cifar"
        raise HsslError(f"--format {format}: only {twins} and {format}:<name> backbones have a {format} twin; this "
                        f"checkpoint's is {backbone}: use --format plain (load it with hssl_cli.load_backbone)")
    tensors = checkpoint.prefixed("backbone")
    mean, std = checkpoint.tensors["data.mean"], checkpoint.tensors["data.std"]
    image_size = checkpoint.recipe.data.image_size
    if format == "plain":
        build = ("hssl_cli.models.backbones.build_backbone(ModelConfig(**json.loads(metadata['model'])), in_channels, "
                 "image_size=int(metadata['image_size']))")
    elif backbone == "resnet18_cifar":
        build = CIFAR_STEM[format].format(c=mean.numel())
    elif backbone == "vit":
        from hssl_cli.models.vit import timm_arguments

        arguments = timm_arguments(checkpoint.recipe.model.vit or ViTConfig(), mean.numel(), image_size)
        build = f"m = timm.models.vision_transformer.VisionTransformer(**{arguments!r})"
    else:
        build = _library_build(backbone, mean.numel())
    metadata = {"format": format, "architecture": backbone, "build": build,
                "model": json.dumps(checkpoint.recipe.model.model_dump(mode="json")),
                "in_channels": str(mean.numel()), "image_size": str(image_size),
                "feature_dim": str(network.feature_dim),
                "data_mean": json.dumps(mean.tolist()), "data_std": json.dumps(std.tolist()),
                "source": str(checkpoint.path), "method": checkpoint.recipe.method.name,
                "epoch": checkpoint.metadata["epoch"]}
    save_safetensors_atomically(out, tensors, metadata)
    return {"out": str(out), "tensors": len(tensors), **metadata}


def _library_build(backbone: str, in_channels: int) -> str:
    """How to build a timm:/torchvision: backbone's own model so that the exported tensors load strictly."""
    library, name = backbone.split(":", 1)
    if library == "timm":
        return f"m = timm.create_model('{name}', num_classes=0, in_chans={in_channels})"
    import torchvision

    from hssl_cli.models.library import classifier_of

    head, _ = classifier_of(torchvision.models.get_model(name, weights=None))
    return f"m = torchvision.models.get_model('{name}'); m.{head} = torch.nn.Identity()"

