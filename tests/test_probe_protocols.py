"""hssl probe's additions: extraction progress, the feature cache, low-label subsets and the papers' SGD
linear evaluation (--protocol standard)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.sources import load_split
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.probe import label_fraction, probe_checkpoint
from hssl_cli.evaluate.feature_cache import FeatureCache
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.measures.linear_sgd import SgdProtocol, train_linear_sgd
from hssl_cli.evaluate.subsets import label_subset
from hssl_cli.recipe import parse_recipe
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    recipe = parse_recipe(TINY_RECIPE, "tiny.yaml", ["train.epochs=1"])
    return pretrain(recipe, tmp_path_factory.mktemp("runs"), device_name="cpu").checkpoint


def test_label_subsets_keep_the_same_fraction_of_every_class_and_are_fixed():
    labels = torch.tensor([0] * 200 + [1] * 100 + [2] * 7)
    kept = label_subset(labels, 0.1)
    assert torch.bincount(labels[kept]).tolist() == [20, 10, 1]  # at least one image of a rare class
    assert torch.equal(kept, label_subset(labels, 0.1)) and not torch.equal(kept, label_subset(labels, 0.1, seed=1))
    assert label_fraction("1%") == 0.01 and label_fraction(" 10% ") == 0.1 and label_fraction("100%") == 1.0
    for bad in ("0%", "101%", "10", "ten%", "-5%"):
        with pytest.raises(HsslError, match="--labels"):
            label_fraction(bad)


def test_extraction_reports_progress_for_every_image():
    counts = []
    features = extract_features(nn.Flatten(), torch.zeros(1100, 1, 2, 2, dtype=torch.uint8), torch.zeros(1),
                                torch.ones(1), batch_size=512, advance=counts.append)
    assert counts == [512, 512, 76] and features.shape == (1100, 4)


def test_cached_features_equal_extracted_ones_and_a_change_of_images_or_weights_misses(tmp_path):
    images = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    calls = []

    def extract(batch):
        calls.append(len(batch))
        return batch.float().flatten(1) * 2

    cache = FeatureCache(tmp_path, "weights-a", {"features": "backbone", "device": "cpu"})
    first, second = cache.features(images, extract), cache.features(images, extract)
    assert torch.equal(first, second) and calls == [20] and (cache.hits, cache.misses) == (1, 1)
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    cache.features(changed, extract)
    FeatureCache(tmp_path, "weights-b", cache.context).features(images, extract)
    assert calls == [20, 20, 20]
    FeatureCache(None, "weights-a", cache.context).features(images, extract)  # --no-cache
    assert calls == [20, 20, 20, 20] and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_an_unwritable_cache_is_a_note_and_the_probe_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = FeatureCache(blocker / "features", "w", {})
    with pytest.warns(match="features not cached"):
        features = cache.features(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), lambda b: b.float().flatten(1))
    assert features.shape == (3, 4)


def test_a_second_probe_reads_the_cache_and_reports_the_same_numbers(trained, tmp_path):
    first = probe_checkpoint(trained, device_name="cpu", progress=False, cache_dir=tmp_path)
    second = probe_checkpoint(trained, device_name="cpu", progress=False, cache_dir=tmp_path)
    assert first["feature_cache"]["misses"] == 2 and second["feature_cache"] == {
        "folder": str(tmp_path), "hits": 2, "misses": 0}
    assert first["results"] == second["results"]
    assert set(second["seconds_by_stage"]) == {"features", "linear", "knn"}
    uncached = probe_checkpoint(trained, device_name="cpu", progress=False, cache=False)
    assert uncached["results"] == first["results"] and uncached["feature_cache"]["folder"] is None


def test_low_label_probe_fits_on_the_fixed_subset(trained):
    full = probe_checkpoint(trained, device_name="cpu", progress=False)
    low = probe_checkpoint(trained, device_name="cpu", progress=False, labels="10%")
    counts = torch.bincount(load_split(parse_recipe(TINY_RECIPE, "tiny.yaml").data, "train").labels)
    assert low["labels"] == "10%" and low["train_size"] == sum(round(0.1 * int(c)) for c in counts) == 142
    assert low["test_size"] == full["test_size"]
    assert low["results"]["knn_k20"]["top1"] <= full["results"]["knn_k20"]["top1"] + 5


def test_sgd_linear_evaluation_learns_separable_classes_and_leaves_the_backbone_alone():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    images = torch.where(labels.view(-1, 1, 1, 1).bool(), 200, 40).to(torch.uint8).expand(200, 1, 8, 8).clone()
    images += torch.randint(0, 20, images.shape, generator=generator, dtype=torch.uint8)
    backbone = nn.Sequential(nn.BatchNorm2d(1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    protocol = SgdProtocol(epochs=5, lr=0.5, batch_size=32)
    layer = train_linear_sgd(backbone, images, labels, 2, torch.tensor([0.5]), torch.tensor([0.25]), protocol)
    again = train_linear_sgd(backbone, images, labels, 2, torch.tensor([0.5]), torch.tensor([0.25]), protocol)
    assert torch.equal(layer.weight, again.weight)  # seeded: the same classifier twice
    features = extract_features(backbone, images, torch.tensor([0.5]), torch.tensor([0.25]))
    assert (layer(features).argmax(1) == labels).float().mean() == 1.0
    assert backbone.training and all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_standard_protocol_says_which_protocol_made_each_number(trained):
    runner = CliRunner()
    result = runner.invoke(app, ["probe", str(trained), "--device", "cpu", "--protocol", "standard", "--epochs", "4",
                                 "--batch-size", "50", "--lr", "2",
                                 "--train-subset", "400", "--test-subset", "200", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["protocol"] == "standard" and report["train_size"] == 400 and report["test_size"] == 200
    assert report["results"]["linear"]["protocol"] == "standard"
    assert "SGD (Nesterov 0.9) 4 epochs" in report["results"]["linear"]["detail"]
    assert report["results"]["knn_k20"]["protocol"] == "knn"
    assert report["results"]["linear"]["top1"] > 30  # ten classes: chance is 10
    for arguments, message in ((["--protocol", "sgd"], "--protocol sgd: choose one of fast, standard, finetune"),
                               (["--labels", "0%"], "--labels 0%"),
                               (["--protocol", "standard", "--epochs", "0"], "--epochs 0"),
                               (["--epochs", "3"], "--epochs: --protocol fast does not read this")):
        result = runner.invoke(app, ["probe", str(trained), "--device", "cpu", *arguments])
        assert result.exit_code == 2 and message in result.output


def test_piped_tables_are_printed_whole(trained):
    result = subprocess.run([sys.executable, "-m", "hssl_cli", "probe", str(trained), "--device", "cpu", "--protocol",
                             "standard", "--epochs", "1", "--test-subset", "100"], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "COLUMNS"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and "cosine, wd 0, crop+flip" in result.stdout
    widest = max(len(line) for line in result.stdout.splitlines())
    assert widest > 120  # wider than a terminal's 80 columns would have allowed
