import json

import pytest
import torch
from safetensors.torch import save_file

import hssl_cli.engine.checkpoint as ckpt
from hssl_cli.data.views import Views
from hssl_cli.errors import CheckpointError
from hssl_cli.methods import build_method


@pytest.fixture
def saved(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1)
    path = tmp_path / "model.safetensors"
    stats = {"mean": torch.tensor([0.3]), "std": torch.tensor([0.2])}
    ckpt.save_model(path, method, recipe, epoch=4, step=40, metrics={"loss": 1.5}, data_stats=stats)
    return path, method, recipe


def test_model_checkpoint_round_trips_tensors_and_metadata(saved):
    path, method, recipe = saved
    loaded = ckpt.load_checkpoint(path)
    assert loaded.recipe == recipe and loaded.epoch == 4 and loaded.step == 40
    assert json.loads(loaded.metadata["metrics"]) == {"loss": 1.5}
    for key in ("hssl_version", "format_version", "method", "backbone", "torch_version"):
        assert loaded.metadata[key]
    rebuilt = build_method(recipe, in_channels=1)
    ckpt.load_module_state(rebuilt, {k: v for k, v in loaded.tensors.items() if not k.startswith("data.")},
                           path, "model")
    for key, value in method.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])
    assert not list(path.parent.glob(".*.tmp")), "the temp file of the atomic write was left behind"


def test_truncated_checkpoint_gives_a_clear_error(saved, tmp_path):
    path, _, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors: not a readable .safetensors file"):
        ckpt.load_checkpoint(truncated)


def test_foreign_safetensors_file_is_named_as_such(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not an hssl checkpoint"):
        ckpt.load_checkpoint(foreign)


def test_newer_format_version_asks_to_upgrade(saved, tmp_path, monkeypatch):
    path, method, recipe = saved
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", ckpt.FORMAT_VERSION + 1)
    newer = tmp_path / "newer.safetensors"
    ckpt.save_model(newer, method, recipe, 0, 0, {}, {"mean": torch.zeros(1), "std": torch.ones(1)})
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", ckpt.FORMAT_VERSION - 1)
    with pytest.raises(CheckpointError, match="upgrade hssl"):
        ckpt.load_checkpoint(newer)


def test_tensors_that_do_not_fit_the_model_are_named(saved, tiny_recipe):
    path, _, _ = saved
    loaded = ckpt.load_checkpoint(path)
    wider = build_method(tiny_recipe("model.projector=[64, 48]"), in_channels=1)
    with pytest.raises(CheckpointError, match=r"shape of projector.3.bias is \(32,\), the model has \(48,\)"):
        ckpt.load_module_state(wider, {k: v for k, v in loaded.tensors.items() if not k.startswith("data.")},
                               path, "model")


def test_a_training_state_is_not_taken_for_a_model(tmp_path, tiny_recipe, saved):
    _, method, recipe = saved
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    method(Views([torch.randn(4, 1, 16, 16)] * 2, []), torch.Generator())["loss"].backward()
    optimizer.step()
    state = tmp_path / "last.state.safetensors"
    ckpt.save_training_state(state, method, optimizer, recipe, 1, 10, {"mean": torch.zeros(1), "std": torch.ones(1)})
    with pytest.raises(CheckpointError, match="this is a training_state file"):
        ckpt.load_checkpoint(state)
    restored = torch.optim.SGD(build_method(recipe, 1).parameters(), lr=0.5, momentum=0.9)
    ckpt.restore_optimizer(restored, ckpt.load_checkpoint(state, kind="training_state"))
    before, after = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert before.keys() == after.keys()
    for index in before:
        assert torch.equal(before[index]["momentum_buffer"], after[index]["momentum_buffer"])
    assert restored.param_groups[0]["lr"] == 0.1
