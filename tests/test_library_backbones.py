"""model.backbone: timm:<name> and torchvision:<name>: any model those libraries build, untrained and without
its classifier, trains in hssl and exports back into the library's own model (loaded strictly, in a fresh
process, computing what hssl's backbone computes)."""

import subprocess
import sys

import pytest
import torch

from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.export import export_backbone
from hssl_cli.evaluate.opening import load_trained_method
from hssl_cli.models.backbones import build_backbone

FRESH_LOAD = """
import sys, torch, timm, torchvision
from safetensors import safe_open
from safetensors.torch import load_file
with safe_open(sys.argv[1], "pt") as handle:
    build = handle.metadata()["build"]
scope = {"torch": torch, "timm": timm, "torchvision": torchvision}
exec(build, scope)
m = scope["m"]
m.load_state_dict(load_file(sys.argv[1]), strict=True)
m.eval()
x = torch.load(sys.argv[2])
torch.save(m(x).detach(), sys.argv[3])
"""


def exported_matches_in_a_fresh_process(checkpoint, tmp_path, format, channels):
    out = tmp_path / f"{format}.safetensors"
    export_backbone(checkpoint, out, format=format)
    images = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(images, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", FRESH_LOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, timeout=120)
    with torch.no_grad():
        expected = load_trained_method(load_checkpoint(checkpoint), torch.device("cpu")).method.backbone(images)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected)


def test_a_timm_backbone_trains_and_exports_to_timm(tmp_path, tiny_recipe):
    recipe = tiny_recipe("model.backbone=timm:test_resnet", "train.epochs=1", "optim.warmup_epochs=0")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    assert result.steps == 11
    exported_matches_in_a_fresh_process(result.checkpoint, tmp_path, "timm", channels=1)


def test_a_torchvision_backbone_trains_and_exports_to_torchvision(tmp_path, tiny_recipe, colour_folder):
    recipe = tiny_recipe("model.backbone=torchvision:resnet18", "data={dataset: imagefolder, root: "
                         f"{colour_folder}, image_size: 16}}", "train.batch_size=8", "train.epochs=1",
                         "optim.warmup_epochs=0")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    assert result.steps == 3
    exported_matches_in_a_fresh_process(result.checkpoint, tmp_path, "torchvision", channels=3)


def test_library_backbones_drop_the_classifier_and_say_their_width():
    network = build_backbone("torchvision:mobilenet_v3_small", in_channels=3)
    assert network.feature_dim == 1024 and network.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 1024)
    network = build_backbone("timm:test_vit", in_channels=3)
    assert network(torch.zeros(1, 3, 160, 160)).shape == (1, network.feature_dim)


def test_wrong_library_backbones_are_one_line_naming_the_key(tmp_path, tiny_recipe):
    for name, message in (("timm:resnet181", "timm:resnet181 is not a model that timm builds; did you mean resnet18"),
                          ("torchvision:resnt50", "did you mean resnet50"),
                          ("torchvision:resnet18", "reads 3-channel images and this data has 1; use timm:resnet18"),
                          ("timm:vit_tiny_patch16_224", "cannot read 1-channel 16x16 images")):
        with pytest.raises(HsslError, match=message):
            pretrain(tiny_recipe(f"model.backbone={name}"), tmp_path, device_name="cpu")
    assert not (tmp_path / "tiny").exists()  # no run folder for a start that failed
    for name, message in (('"timm:"', "unknown backbone 'timm:'"), ("timm:../x", "unknown backbone"),
                          ("resnet18", "unknown backbone 'resnet18'.*model: timm:resnet18 or torchvision:resnet18")):
        with pytest.raises(HsslError, match=message):
            tiny_recipe(f"model.backbone={name}")
