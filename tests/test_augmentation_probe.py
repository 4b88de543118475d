"""The augmentation probe (hssl probe --augmentation): R² of a_t regressed on [f(x), f(t(x))] is ~0 for
features that ignore the augmentation and high for features that show it."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.engine.train import pretrain
from hssl_cli.evaluate import opening
from hssl_cli.evaluate.commands.augmentation_probe import augmentation_probe, r2_scores


def test_r2_matches_hand_computed_values():
    target = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    predicted = np.array([[1.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    # column 1: residual 1, total 2 -> 0.5; column 2: predicting the mean -> 0
    assert r2_scores(predicted, target) == pytest.approx([0.5, 0.0])


class Pixels(nn.Module):
    """f(x) = the image itself, flattened: every crop and jitter shows."""

    feature_dim = 256

    def forward(self, images):
        return images.flatten(1)


class Constant(nn.Module):
    """An invariant f: the same features whatever the view."""

    feature_dim = 4

    def forward(self, images):
        return torch.ones(len(images), 4) + 0 * images.flatten(1)[:, :4]


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    from hssl_cli.recipe import parse_recipe
    from tests.conftest import TINY_RECIPE

    recipe = parse_recipe(TINY_RECIPE, "tiny.yaml", overrides=["train.epochs=0"])
    return pretrain(recipe, tmp_path_factory.mktemp("runs"), device_name="cpu").checkpoint


@pytest.mark.parametrize(("backbone", "low", "high"), [(Constant, -0.05, 0.05), (Pixels, 0.3, 1.0)])
def test_invariant_features_predict_nothing_and_pixels_predict_the_crop(untrained_checkpoint, monkeypatch,
                                                                         backbone, low, high):
    real = opening.load_trained_method

    def with_backbone(checkpoint, device):
        trained = real(checkpoint, device)
        trained.method.backbone = backbone()
        return trained

    monkeypatch.setattr(opening, "load_trained_method", with_backbone)
    report = augmentation_probe(untrained_checkpoint, samples=1000, device_name="cpu")
    assert report["fit_images"] == report["scored_images"] == 500
    assert set(report["r2_by_group"]) == {"crop", "colour", "jitter_order"}  # flip, blur, solarize never vary
    assert low <= report["r2_by_group"]["crop"] <= high


def test_the_cli_prints_the_table_and_json(untrained_checkpoint):
    runner = CliRunner()
    printed = runner.invoke(app, ["probe", str(untrained_checkpoint), "--augmentation", "--train-samples", "200",
                                  "--device", "cpu"])
    assert printed.exit_code == 0, printed.output
    assert "augmentation parameters from" in printed.output and "crop" in printed.output
    report = json.loads(runner.invoke(app, ["probe", str(untrained_checkpoint), "--augmentation", "--train-samples",
                                            "200", "--device", "cpu", "--json"]).stdout)
    assert report["r2"] <= 1 and report["fit_images"] == 100
    refused = runner.invoke(app, ["probe", str(untrained_checkpoint), "--augmentation", "--train-samples", "10"])
    assert refused.exit_code == 2 and "at least 20" in refused.output
    zero = runner.invoke(app, ["probe", str(untrained_checkpoint), "--augmentation", "--train-samples", "0"])
    assert zero.exit_code == 2 and "0 images (--train-samples" in zero.output  # not silently the default
    ignored = runner.invoke(app, ["probe", str(untrained_checkpoint), "--augmentation", "--features", "projector",
                                  "--validation"])
    assert ignored.exit_code == 2 and "drop --features, --validation" in ignored.output
