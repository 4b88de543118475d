"""`--init-from` a library backbone's weights (issue 27): a timm/torchvision state_dict, as .safetensors or as a
.pth read with weights_only=True, fills the backbone only; the classifier is left out with a note, the heads
start as the seed initialises them, EMA targets as copies of the loaded backbone; anything else that does not
fit is one line, grouped by layer."""

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.initial_weights import load_initial_weights
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import CheckpointError, CheckpointNote
from hssl_cli.methods import build_method
from hssl_cli.models.backbones import build_backbone
from tests.conftest import C4_BACKBONE


class TouchesAFile:
    """A pickled object whose unpickling would run code (create `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def timm_resnet18_weights(folder: Path) -> dict[str, torch.Tensor]:
    """An ImageNet-shaped timm ResNet-18 (with its classifier), seeded, as .safetensors and .pth in `folder`."""
    torch.manual_seed(11)
    network = timm.create_model("resnet18", pretrained=False)
    tensors = {key: value.clone() for key, value in network.state_dict().items()}
    save_file(tensors, folder / "resnet18.safetensors")
    torch.save(tensors, folder / "resnet18.pth")
    return tensors


def init_from_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(row for row in rows if "init_from" in row)


def colour_recipe(tiny_recipe, colour_folder, *overrides: str):
    return tiny_recipe("model.backbone=timm:resnet18", f"data={{dataset: imagefolder, root: {colour_folder}, "
                       "image_size: 16}", "train.batch_size=8", "train.epochs=0", *overrides)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_a_timm_weights_file_is_the_backbone_at_step_0(tmp_path, tiny_recipe, colour_folder, suffix):
    weights = timm_resnet18_weights(tmp_path)
    path = tmp_path / f"resnet18.{suffix}"
    with pytest.warns(CheckpointNote, match=r"resnet18\.\w+: 120 backbone tensors loaded into timm:resnet18; its "
                      r"classifier fc \(2 tensors\) is left out; the projector and other heads start fresh"):
        run = pretrain(colour_recipe(tiny_recipe, colour_folder), tmp_path / "runs", device_name="cpu",
                       init_from=path)
    backbone = load_checkpoint(run.checkpoint).prefixed("backbone")
    assert backbone.keys() == weights.keys() - {"fc.weight", "fc.bias"}
    assert all(torch.equal(backbone[key], weights[key]) for key in backbone)
    assert init_from_row(run.run_dir) == {"step": 0, "init_from": str(path), "init_from_kind": "backbone weights",
                         "init_from_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_byol_target_starts_as_the_loaded_backbone_and_the_heads_from_the_seed(tmp_path, tiny_recipe, colour_folder):
    weights = timm_resnet18_weights(tmp_path)
    recipe = colour_recipe(tiny_recipe, colour_folder, "method={name: byol, predictor: [64, 32]}")
    loaded = load_file(pretrain(recipe, tmp_path / "loaded", device_name="cpu",
                                init_from=tmp_path / "resnet18.safetensors").checkpoint)
    fresh = load_file(pretrain(recipe, tmp_path / "fresh", device_name="cpu").checkpoint)
    for key in weights.keys() - {"fc.weight", "fc.bias"}:
        assert torch.equal(loaded[f"backbone.{key}"], weights[key])
        assert torch.equal(loaded[f"target.backbone.{key}"], weights[key])
    assert not torch.equal(fresh["backbone.conv1.weight"], weights["conv1.weight"])
    heads = [key for key in fresh if key.startswith(("projector.", "predictor.", "target.projector."))]
    assert heads and all(torch.equal(loaded[key], fresh[key]) for key in heads)


@pytest.mark.parametrize("method", [
    "method={name: byol, predictor: [64, 32]}", "method={name: mocov3, predictor: [64, 32]}",
    "method={name: directpred}", "method={name: hssl, loss: byol, predictor: [16, 8]}"])
def test_every_ema_target_starts_as_a_copy_of_the_loaded_backbone(tmp_path, tiny_recipe, method):
    recipe = tiny_recipe(*([C4_BACKBONE] if "hssl" in method else []), method)
    torch.manual_seed(99)
    weights = build_backbone(recipe.model, in_channels=1).state_dict()
    save_file(weights, tmp_path / "backbone.safetensors")
    torch.manual_seed(recipe.seed)
    method_module = build_method(recipe, in_channels=1)
    with pytest.warns(CheckpointNote, match="the projector and other heads start fresh"):
        load_initial_weights(method_module, tmp_path / "backbone.safetensors", recipe.model.backbone)
    for copy in (method_module.backbone, method_module.target["backbone"]):
        assert all(torch.equal(value, weights[key]) for key, value in copy.state_dict().items())


def test_a_wrong_architecture_is_refused_layer_by_layer(tmp_path, tiny_recipe, colour_folder):
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), tmp_path / "vit.safetensors")
    message = (r"--init-from .*vit.safetensors: its tensors do not fit model.backbone timm:resnet18 \(missing: conv1 "
               r"\(1 tensor\), bn1 \(4 tensors\), layer1 \(20 tensors\), layer2 \(25 tensors\), layer3 \(25 "
               r"tensors\), layer4 \(25 tensors\); unexpected: blocks \(72 tensors\), cls_token \(1 tensor\), head "
               r"\(2 tensors\), norm \(2 tensors\), patch_embed \(2 tensors\), pos_embed \(1 tensor\)\); give the "
               r"weights of timm:resnet18 \(the model the recipe builds\), or set model.backbone to the file's")
    with pytest.raises(CheckpointError, match=message):
        pretrain(colour_recipe(tiny_recipe, colour_folder), tmp_path / "runs", device_name="cpu",
                 init_from=tmp_path / "vit.safetensors")
    assert not (tmp_path / "runs").exists()


def test_imagenet_resnet18_weights_do_not_fit_the_cifar_stem(tmp_path, tiny_recipe):
    timm_resnet18_weights(tmp_path)
    recipe = tiny_recipe("model.backbone=resnet18_cifar")
    message = (r"\(shape: conv1.weight \[64,3,7,7\] in the file vs \[64,3,3,3\] in the backbone\); resnet18_cifar has "
               r"the CIFAR stem .* set model.backbone: timm:resnet18 or torchvision:resnet18")
    with pytest.raises(CheckpointError, match=message):
        load_initial_weights(build_method(recipe, in_channels=3), tmp_path / "resnet18.pth", "resnet18_cifar")


def test_weights_for_other_input_channels_say_so(tmp_path, tiny_recipe):
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "rgb.safetensors")
    recipe = tiny_recipe("model.backbone=timm:test_resnet")  # digits: 1-channel images
    message = (r"\(shape: conv1.0.weight \[16,3,3,3\] in the file vs \[16,1,3,3\] in the backbone\); the file's first "
               r"layer reads 3-channel images and this data has 1 channels")
    with pytest.raises(CheckpointError, match=message):
        load_initial_weights(build_method(recipe, in_channels=1), tmp_path / "rgb.safetensors", "timm:test_resnet")


def test_the_file_s_own_architecture_is_named_when_its_metadata_says_it(tmp_path, tiny_recipe):
    save_file(build_backbone("small_convnet", in_channels=1).state_dict(), tmp_path / "exported.safetensors",
              metadata={"format": "plain", "architecture": "small_convnet"})
    recipe = tiny_recipe("model.backbone=timm:test_resnet")
    with pytest.raises(CheckpointError, match=r"missing: conv1 .*; unexpected: features \(24 tensors\)\); the file is "
                       "for small_convnet \\(its metadata\\); the recipe builds timm:test_resnet: set model.backbone"):
        load_initial_weights(build_method(recipe, in_channels=1), tmp_path / "exported.safetensors", "timm:test_resnet")


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, tiny_recipe):
    marker = tmp_path / "code-ran"
    torch.save({"features.0.weight": torch.zeros(1), "payload": TouchesAFile(marker)}, tmp_path / "hostile.pth")
    recipe = tiny_recipe()
    with pytest.raises(CheckpointError, match=r"hostile.pth: torch refuses to read it with weights_only=True, which "
                       r"hssl insists on \(Unsupported global: .*\): it holds pickled Python objects besides tensors; "
                       r"save the state_dict alone"):
        load_initial_weights(build_method(recipe, in_channels=1), tmp_path / "hostile.pth", "small_convnet")
    assert not marker.exists()
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(CheckpointError, match="truncated.safetensors: not a readable .safetensors file"):
        load_initial_weights(build_method(recipe, in_channels=1), tmp_path / "truncated.safetensors", "small_convnet")
    # sizes and offsets agree, but the shape asks for 16 bytes where the offsets give 8: safetensors refuses it
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "misshapen.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match="misshapen.safetensors: not a readable .safetensors file"):
        load_initial_weights(build_method(recipe, in_channels=1), tmp_path / "misshapen.safetensors", "small_convnet")


def test_a_training_script_s_checkpoint_gives_its_state_dict_without_the_ddp_prefix(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    torch.manual_seed(5)
    weights = build_backbone("small_convnet", in_channels=1).state_dict()
    torch.save({"epoch": 90, "state_dict": {f"module.{key}": value for key, value in weights.items()}},
               tmp_path / "trained.pth")
    method = build_method(recipe, in_channels=1)
    with pytest.warns(CheckpointNote, match=r"24 backbone tensors \(under 'state_dict', 'module.' removed\)"):
        load_initial_weights(method, tmp_path / "trained.pth", "small_convnet")
    assert all(torch.equal(value, weights[key]) for key, value in method.backbone.state_dict().items())
    torch.save({"epoch": 90, "optimizer": {"lr": 0.1}}, tmp_path / "no-weights.pth")
    with pytest.raises(CheckpointError, match=r"no state_dict in it \(its top-level entries: epoch, optimizer\)"):
        load_initial_weights(method, tmp_path / "no-weights.pth", "small_convnet")


def test_torchvision_weights_without_batch_counters_load(tmp_path, tiny_recipe):
    """torchvision's published ImageNet weights predate BatchNorm's num_batches_tracked."""
    torch.manual_seed(2)
    weights = {key: value for key, value in torchvision.models.resnet18().state_dict().items()
               if not key.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "resnet18-torchvision.pth")
    recipe = tiny_recipe("model.backbone=torchvision:resnet18")
    method = build_method(recipe, in_channels=3)
    with pytest.warns(CheckpointNote, match=r"its classifier fc \(2 tensors\) is left out"):
        load_initial_weights(method, tmp_path / "resnet18-torchvision.pth", "torchvision:resnet18")
    loaded = method.backbone.state_dict()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights if not key.startswith("fc."))


def test_init_from_an_hssl_checkpoint_records_its_kind(tmp_path, tiny_recipe):
    first = pretrain(tiny_recipe("train.epochs=0"), tmp_path, device_name="cpu")
    second = pretrain(tiny_recipe("train.epochs=0"), tmp_path, device_name="cpu", init_from=first.run_dir)
    assert init_from_row(second.run_dir) == {
        "step": 0, "init_from": str(first.checkpoint), "init_from_kind": "hssl checkpoint",
        "init_from_sha256": hashlib.sha256(first.checkpoint.read_bytes()).hexdigest()}


def test_timm_vision_transformer_weights_fill_the_vit_less_their_classifier(tmp_path, tiny_recipe):
    from timm.models.vision_transformer import VisionTransformer

    from hssl_cli.models.vit import timm_arguments
    from tests.conftest import TINY_VIT

    recipe = tiny_recipe(f"model={{backbone: vit, vit: {TINY_VIT}, projector: [8]}}")
    torch.manual_seed(1)
    library = VisionTransformer(**timm_arguments(recipe.model.vit, 1, 16)
                                | {"num_classes": 10})  # a library checkpoint: its classifier included
    save_file(library.state_dict(), tmp_path / "vit.safetensors")
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1)
    with pytest.warns(CheckpointNote, match="head"):
        load_initial_weights(method, tmp_path / "vit.safetensors", "vit")
    loaded = method.backbone.state_dict()
    assert "head.weight" not in loaded
    assert all(torch.equal(loaded[key], value) for key, value in library.state_dict().items() if key in loaded)
