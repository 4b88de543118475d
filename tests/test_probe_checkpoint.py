"""`hssl probe` end to end on untrained checkpoints (train.epochs: 0): which features it reads, subsets,
the validation split and rotated test sets."""

import pytest
import torch

from hssl_cli.data.augment import normalize
from hssl_cli.data.sources import load_split
from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.probe import probe_checkpoint
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.measures.frozen_probes import knn_probe
from hssl_cli.evaluate.opening import feature_model, load_trained_method
from hssl_cli.recipe import parse_recipe
from tests.test_hssl import TINY_HSSL


@pytest.fixture(scope="module")
def untrained_hssl(tmp_path_factory):
    """An H-SSL checkpoint that nothing trained: its head has only ever seen single fibres' shapes."""
    torch.set_num_threads(1)
    recipe = parse_recipe(TINY_HSSL, "tiny_hssl.yaml", ["train.epochs=0"])
    return pretrain(recipe, tmp_path_factory.mktemp("runs"), device_name="cpu").checkpoint


def test_epochs_zero_writes_the_initialised_model_as_epoch_0(untrained_hssl):
    checkpoint = load_checkpoint(untrained_hssl)
    assert checkpoint.epoch == 0 and checkpoint.step == 0
    assert any(key.startswith("projector.") for key in checkpoint.tensors)


def test_projector_probe_reads_the_methods_embedding_not_the_head_on_pooled_features(untrained_hssl):
    trained = load_trained_method(load_checkpoint(untrained_hssl), torch.device("cpu"))
    method = trained.method
    images = load_split(parse_recipe(TINY_HSSL, "x.yaml").data, "train").images[:64]
    probed = extract_features(feature_model(method, "projector"), images, trained.mean, trained.std)
    with torch.no_grad():
        normalised = normalize(images, trained.mean, trained.std)
        embedding = method.embedding(normalised)  # h(z_e(x)): the head on the identity fibre
        head_on_pooled = method.projector(method.backbone(normalised))  # the old, wrong input
    assert torch.allclose(probed, embedding, atol=1e-6)
    assert not torch.allclose(probed, head_on_pooled, atol=1e-3)

    report = probe_checkpoint(untrained_hssl, features="projector", device_name="cpu", progress=False)
    split = load_split(parse_recipe(TINY_HSSL, "x.yaml").data, "train")
    test = load_split(parse_recipe(TINY_HSSL, "x.yaml").data, "test")
    with torch.no_grad():
        train_embedding = method.embedding(normalize(split.images, trained.mean, trained.std))
        test_embedding = method.embedding(normalize(test.images, trained.mean, trained.std))
    knn = knn_probe(train_embedding, split.labels, test_embedding, test.labels, 10, k=20)
    assert report["results"]["knn_k20"]["top1"] == pytest.approx(knn["top1"])
    assert report["feature_dim"] == 8  # the projector's width, not the backbone's 3 pooled channels


def test_subsets_validation_split_and_rotated_test_sets(untrained_hssl):
    report = probe_checkpoint(untrained_hssl, device_name="cpu", progress=False, train_samples=300,
                              test_samples=100, test_rotations=[90, 33])
    assert report["train_size"] == 300 and report["test_size"] == 100 and report["test_split"] == "test"
    results = report["results"]
    assert {"linear", "knn_k20", "knn_k200", "linear@rot90", "knn_k20@rot90", "linear@rot33"} <= set(results)
    # the backbone is C4-invariant (group max pooling): a 90-degree turn of the test images changes nothing
    assert results["linear@rot90"]["top1"] == pytest.approx(results["linear"]["top1"])
    assert results["knn_k20@rot90"]["top1"] == pytest.approx(results["knn_k20"]["top1"])

    held_out = probe_checkpoint(untrained_hssl, device_name="cpu", progress=False, train_samples=300,
                                test_samples=100, validation=True)
    assert held_out["test_split"] == "train (held out)" and held_out["test_size"] == 100
    with pytest.raises(HsslError, match="--train-samples 5"):
        probe_checkpoint(untrained_hssl, device_name="cpu", progress=False, train_samples=5)
