"""`hssl export` and the Python API: a checkpoint's backbone loads outside hssl, strictly, and computes
what hssl's does."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import hssl_cli
from hssl_cli.cli import app
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.export import export_backbone

FRESH_TORCHVISION = """
import sys, torch, torchvision
from safetensors.torch import load_file
m = torchvision.models.resnet18(); m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
m.maxpool = torch.nn.Identity(); m.fc = torch.nn.Identity()
m.load_state_dict(load_file(sys.argv[1]), strict=True)
m.eval()
x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
torch.save(m(x).detach(), sys.argv[2])
"""


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    from hssl_cli.recipe import parse_recipe
    from tests.conftest import TINY_RECIPE

    recipe = parse_recipe(TINY_RECIPE, "tiny.yaml", ["model.backbone=resnet18_cifar", "train.epochs=0"])
    return pretrain(recipe, tmp_path_factory.mktemp("runs"), device_name="cpu").checkpoint


def test_a_torchvision_export_loads_strictly_in_a_fresh_process_and_computes_the_same(resnet_checkpoint, tmp_path):
    out = tmp_path / "resnet18.safetensors"
    result = CliRunner().invoke(app, ["export", str(resnet_checkpoint), "--format", "torchvision", "--out", str(out)])
    assert result.exit_code == 0, result.output
    features = tmp_path / "features.pt"
    subprocess.run([sys.executable, "-c", FRESH_TORCHVISION, str(out), str(features)], check=True)
    backbone = hssl_cli.load_backbone(resnet_checkpoint)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(torch.load(features), backbone(x), atol=1e-5)


def test_a_timm_export_loads_strictly(resnet_checkpoint, tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "resnet18.safetensors"
    export_backbone(resnet_checkpoint, out, format="timm")
    model = timm.create_model("resnet18", num_classes=0)
    model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(out), strict=True)


def test_a_plain_export_rebuilds_with_its_metadata_and_the_api_loads_checkpoints(tmp_path, tiny_recipe):
    import json

    from safetensors import safe_open

    from hssl_cli.models.backbones import build_backbone
    from hssl_cli.recipe import ModelConfig

    checkpoint = pretrain(tiny_recipe("train.epochs=0"), tmp_path, device_name="cpu").checkpoint
    out = tmp_path / "plain.safetensors"
    export_backbone(checkpoint, out)
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    backbone = build_backbone(ModelConfig(**json.loads(metadata["model"])), int(metadata["in_channels"]))
    backbone.load_state_dict(load_file(out), strict=True)
    trained = hssl_cli.load_method(checkpoint)
    assert trained.method.embedding(torch.randn(3, 1, 16, 16)).shape == (3, 32)
    assert json.loads(metadata["data_mean"]) == pytest.approx(trained.mean.tolist())
    with pytest.raises(HsslError, match="only resnet18_cifar and torchvision:<name> backbones have a torchvision twin"):
        export_backbone(checkpoint, tmp_path / "x.safetensors", format="torchvision")


def test_a_scale_lifted_backbone_exports_plain_only(tmp_path, tiny_recipe):
    recipe = tiny_recipe("train.epochs=0", "model.backbone=resnet18_cifar", "model.scales={levels: 2}",
                         "method={name: hssl, fibres: scales}")
    checkpoint = pretrain(recipe, tmp_path, device_name="cpu").checkpoint
    with pytest.raises(HsslError, match="multi-scale lifting of resnet18_cifar"):
        export_backbone(checkpoint, tmp_path / "tv.safetensors", format="torchvision")
    from hssl_cli.models.backbones import build_backbone

    export_backbone(checkpoint, tmp_path / "plain.safetensors")
    backbone = build_backbone(recipe.model, in_channels=1).eval()
    backbone.load_state_dict(load_file(tmp_path / "plain.safetensors"), strict=True)
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone(images), hssl_cli.load_backbone(checkpoint)(images))


def test_a_vit_exports_to_timm_and_loads_strictly_into_the_model_its_metadata_names(tmp_path, tiny_recipe):
    import json

    from safetensors import safe_open

    from hssl_cli.models.backbones import build_backbone
    from hssl_cli.recipe import ModelConfig
    from tests.conftest import TINY_VIT

    recipe = tiny_recipe("train.epochs=0", f"model={{backbone: vit, vit: {TINY_VIT}, projector: [8]}}")
    checkpoint = pretrain(recipe, tmp_path, device_name="cpu").checkpoint
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = hssl_cli.load_backbone(checkpoint)(images)
    for format in ("timm", "plain"):
        out = tmp_path / f"{format}.safetensors"
        export_backbone(checkpoint, out, format=format)
        with safe_open(out, "pt") as handle:
            metadata = handle.metadata()
        if format == "timm":
            import timm.models.vision_transformer

            namespace = {"timm": timm}
            exec(metadata["build"], namespace)  # the line the file says builds its model
            model = namespace["m"]
        else:
            model = build_backbone(ModelConfig(**json.loads(metadata["model"])), int(metadata["in_channels"]),
                                   image_size=int(metadata["image_size"]))
        model.load_state_dict(load_file(out), strict=True)
        with torch.no_grad():
            assert torch.equal(model.eval()(images), expected)
