"""Small traps a new user fell into (issue 14, item 5), each now a clear message or a sane default."""

import pickle

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import CheckpointError, DataError, HsslError, RecipeError
from hssl_cli.recipe import parse_recipe


def test_compile_auto_compiles_on_cuda_only(tmp_path, tiny_recipe, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile was called on the CPU")

    monkeypatch.setattr(torch, "compile", no_compile)
    result = pretrain(tiny_recipe("train.compile=auto", "train.epochs=1"), tmp_path, device_name="cpu")
    assert result.steps == 11


def test_a_warm_up_longer_than_the_run_is_refused():
    with pytest.raises(RecipeError, match="optim.warmup_epochs=10 exceeds train.epochs=5"):
        parse_recipe("name: x\noptim: {warmup_epochs: 10}\ntrain: {epochs: 5}\n", "x.yaml")
    parse_recipe("name: x\noptim: {warmup_epochs: 10}\ntrain: {epochs: 0}\n", "x.yaml")  # untrained: no schedule


def test_a_method_name_typo_names_the_key():
    with pytest.raises(RecipeError, match=r"unknown key 'method.nmae'; did you mean 'method.name'"):
        parse_recipe("name: x\nmethod: {nmae: simclr}\n", "x.yaml")
    with pytest.raises(RecipeError, match=r"method.name: 'simclrr' is not a method; did you mean 'simclr'"):
        parse_recipe("name: x\nmethod: {name: simclrr}\n", "x.yaml")


def test_init_from_starts_a_new_run_from_the_weights(tmp_path, tiny_recipe):
    first = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")
    copy = pretrain(tiny_recipe("train.epochs=0"), tmp_path, device_name="cpu", init_from=first.checkpoint)
    assert copy.run_dir != first.run_dir
    trained, started = load_file(first.checkpoint), load_file(copy.checkpoint)
    assert all(torch.equal(trained[key], started[key]) for key in trained if not key.startswith("data."))
    with pytest.raises(CheckpointError, match=r"model \(--init-from\) tensors do not fit"):
        pretrain(tiny_recipe("model.projector=[64, 16]"), tmp_path, device_name="cpu", init_from=first.checkpoint)


def test_resume_from_an_epoch_file_points_to_init_from(tmp_path, tiny_recipe):
    first = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")
    with pytest.raises(HsslError, match="only a run's last state can be resumed .* --init-from"):
        pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu",
                 resume=str(first.run_dir / "epoch-0001.safetensors"))


def test_a_failed_start_leaves_no_run_folder(tmp_path, tiny_recipe):
    with pytest.raises(DataError):
        pretrain(tiny_recipe("data={dataset: mnist, root: /nonexistent}"), tmp_path, device_name="cpu")
    with pytest.raises(HsslError, match="exceeds the 1437 images"):
        pretrain(tiny_recipe("train.batch_size=5000"), tmp_path, device_name="cpu")
    assert not any(tmp_path.rglob("*"))


def test_cifar10_pointed_at_an_image_folder_tree_suggests_imagefolder(tmp_path):
    from PIL import Image

    from hssl_cli.data.sources import load_split

    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "0.png")
    config = parse_recipe(f"name: x\ndata: {{dataset: cifar10, root: {tmp_path}}}\n", "x.yaml").data
    with pytest.raises(DataError, match="looks like an image-folder tree .*: set data.dataset: imagefolder"):
        load_split(config, "train")


@pytest.mark.parametrize("content, kind", [
    (b"name: quickstart\nseed: 0\n", "a text file: a recipe"),
    (b"PK\x03\x04" + bytes(60), "a zip archive: torch.save's .pt/.pth format"),
    (pickle.dumps({"state_dict": list(range(20))}, protocol=4), "a Python pickle"),
])  # fmt: skip
def test_a_foreign_file_is_named_for_what_it_is(tmp_path, content, kind):
    path = tmp_path / "foreign.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"not a .safetensors file \\({kind}"):
        load_checkpoint(path)


def test_a_checkpoint_whose_header_length_starts_with_a_pickle_byte_loads(tmp_path):
    """A header of 0x..80 bytes begins with byte 0x80, as a pickle does: it is still safetensors."""
    from safetensors.torch import save_file

    from hssl_cli.engine.checkpoint import foreign_format

    for padding in range(300):
        path = tmp_path / "x.safetensors"
        save_file({"t": torch.zeros(1)}, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and foreign_format(path) is None
