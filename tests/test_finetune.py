"""hssl probe --protocol finetune: the backbone and a linear head trained end to end (SimCLR/BYOL's
semi-supervised protocol), on a copy of the checkpoint's backbone, reported as not comparable with the frozen
protocols."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.probe import FINETUNE_NOTE, training_protocols
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.measures.finetune import finetune, steps
from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
from hssl_cli.recipe import parse_recipe
from tests.conftest import TINY_RECIPE

MEAN, STD = torch.tensor([0.5]), torch.tensor([0.25])


def _bright_and_dark(count: int = 64, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by brightness, which crops and flips keep."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.randint(0, 80, (count, 1, size, size), generator=generator)
    images = images + 120 * labels.view(-1, 1, 1, 1)  # class 1 is brighter
    return images.to(torch.uint8), labels


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def test_finetuning_learns_a_separable_task_on_a_copy_and_is_repeatable():
    images, labels = _bright_and_dark()
    backbone = _backbone().eval()
    before = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    protocol = FinetuneProtocol(epochs=8, batch_size=16, lr=0.5)
    calls = []
    classifier = finetune(backbone, images, labels, 2, MEAN, STD, protocol, advance=calls.append)
    accuracy = (extract_features(classifier, images, MEAN, STD).argmax(1) == labels).float().mean()
    assert accuracy > 0.9
    assert len(calls) == steps(len(images), protocol) == 8 * 4
    assert all(torch.equal(before[name], tensor) for name, tensor in backbone.state_dict().items())  # untouched
    tuned = dict(classifier.backbone.named_parameters())
    assert any(not torch.equal(tuned[name], value) for name, value in backbone.named_parameters())
    again = finetune(backbone, images, labels, 2, MEAN, STD, protocol)
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), again.state_dict().values(),
                                                strict=True))


def test_the_backbone_learns_at_its_own_rate():
    """backbone_lr_scale 0: only the head moves (the backbone's BatchNorm statistics still follow the data)."""
    images, labels = _bright_and_dark()
    backbone = _backbone().eval()
    frozen = finetune(backbone, images, labels, 2, MEAN, STD, FinetuneProtocol(epochs=2, batch_size=16,
                                                                              backbone_lr_scale=0.0))
    assert all(torch.equal(tuned, original) for tuned, original in zip(frozen.backbone.parameters(),
                                                                       backbone.parameters(), strict=True))
    assert frozen.head.weight.abs().sum() > 0
    adamw = finetune(backbone, images, labels, 2, MEAN, STD, FinetuneProtocol(epochs=2, batch_size=16,
                                                                             optimizer="adamw"))
    assert any(not torch.equal(tuned, original) for tuned, original in zip(adamw.backbone.parameters(),
                                                                           backbone.parameters(), strict=True))


def test_a_diverging_finetune_is_a_clear_error_and_bad_settings_are_refused():
    images, labels = _bright_and_dark()
    broken = nn.Sequential(nn.Flatten(), nn.Linear(144, 4))
    nn.init.constant_(broken[1].weight, float("inf"))  # a backbone whose features overflow: the loss is not finite
    with pytest.raises(HsslError, match="the loss is nan at epoch 1, step 1; lower --lr"):
        finetune(broken, images, labels, 2, MEAN, STD, FinetuneProtocol(epochs=1, batch_size=16))
    with pytest.raises(HsslError, match="--optimizer lamb"):
        FinetuneProtocol(optimizer="lamb")
    with pytest.raises(HsslError, match="--optimizer: --protocol standard does not read this"):
        training_protocols("standard", optimizer="adamw")
    with pytest.raises(HsslError, match="--epochs"):
        training_protocols("fast", epochs=3)
    sgd, tuned = training_protocols("finetune", epochs=3, backbone_lr_scale=1.0)
    assert sgd is None and tuned == FinetuneProtocol(epochs=3, backbone_lr_scale=1.0)
    sgd, tuned = training_protocols("standard", lr=0.2)
    assert sgd.lr == 0.2 and sgd.epochs == 100 and tuned is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    recipe = parse_recipe(TINY_RECIPE, "tiny.yaml", ["train.epochs=1"])
    return pretrain(recipe, tmp_path_factory.mktemp("runs"), device_name="cpu").checkpoint


def test_probe_finetune_reports_its_protocol_and_that_it_is_not_comparable(checkpoint):
    result = CliRunner().invoke(app, ["probe", str(checkpoint), "--protocol", "finetune", "--labels", "10%",
                                      "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["protocol"] == "finetune" and report["note"] == FINETUNE_NOTE and report["labels"] == "10%"
    assert list(report["results"]) == ["finetune"]
    row = report["results"]["finetune"]
    assert row["protocol"] == "finetune" and "fine-tuned end to end" in row["detail"] and 0 <= row["top1"] <= 100
    assert report["train_size"] < 200 and set(report["seconds_by_stage"]) == {"finetune", "test"}
    table = CliRunner().invoke(app, ["probe", str(checkpoint), "--protocol", "finetune", "--labels", "10%",
                                     "--epochs", "1", "--device", "cpu"])
    assert table.exit_code == 0 and "not comparable with the frozen protocols" in table.output


def test_probe_finetune_refuses_what_it_cannot_do(checkpoint):
    for extra, message in ((["--features", "projector"], "drop --features projector"),
                           (["--optimizer", "lamb"], "--optimizer lamb")):
        result = CliRunner().invoke(app, ["probe", str(checkpoint), "--protocol", "finetune", "--device", "cpu",
                                          *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(app, ["probe", str(checkpoint), "--optimizer", "adamw", "--device", "cpu"])
    assert result.exit_code == 2 and "--optimizer: --protocol fast does not read this" in result.output


def test_a_suites_finetune_probe_takes_finetunings_defaults_unless_it_sets_them():
    from hssl_cli.sweep.suite import ProbeSettings

    assert (ProbeSettings().epochs, ProbeSettings().lr) == (100, 0.1)  # the linear evaluation's, as before
    tuned = ProbeSettings(protocol="finetune")
    assert (tuned.epochs, tuned.lr, tuned.backbone_lr_scale, tuned.optimizer) == (30, 0.05, 0.1, "sgd")
    assert ProbeSettings(protocol="finetune", optimizer="adamw").lr == 1e-3
    assert (ProbeSettings(protocol="finetune", epochs=5, lr=0.2).epochs, ProbeSettings(protocol="finetune",
                                                                                      lr=0.2).lr) == (5, 0.2)
    stored = ProbeSettings(protocol="finetune").model_dump(mode="json")
    assert ProbeSettings.model_validate(stored) == ProbeSettings(protocol="finetune")  # a stored cell matches


def test_a_kernel_regime_feature_map_is_not_fine_tuned():
    """Its network kernels have parameters, but they are the fixed kernel's: training them is another protocol."""
    from hssl_cli.methods.kernel import KernelFeatureMap
    from hssl_cli.models.kernels import NetworkFeatureKernel

    images, labels = _bright_and_dark()
    network = _backbone()
    network.feature_dim = 8
    kernel = NetworkFeatureKernel(network)  # a random network's features: parameters, fixed by definition
    feature_map = KernelFeatureMap(kernel, (1, 12, 12), num_support=0, num_basis=8, embedding_dim=4, block_size=64)
    assert any(True for _ in feature_map.parameters())
    with pytest.raises(HsslError, match="kernel-regime feature map"):
        finetune(feature_map, images, labels, 2, MEAN, STD, FinetuneProtocol(epochs=1))


def test_a_suites_probe_refuses_before_any_cell_runs_what_the_probe_would_refuse_after():
    from pydantic import ValidationError

    from hssl_cli.sweep.suite import ProbeSettings

    for settings, message in (({"labels": "0%"}, "labels: 0%"), ({"labels": "150%"}, "labels: 150%"),
                              ({"protocol": "finetune", "features": "projector"}, "frozen-feature evaluations"),
                              ({"protocol": "finetune", "exact_kernel_knn": True}, "frozen-feature evaluations")):
        with pytest.raises(ValidationError, match=message):
            ProbeSettings(**settings)
    assert ProbeSettings(labels="10%").labels == "10%"
