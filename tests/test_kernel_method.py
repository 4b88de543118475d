"""The kernel method end to end: fit on digits, the induced kernel, approximations, checkpoint, CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.augment import Augmenter, normalize
from hssl_cli.data.sources import load_split
from hssl_cli.data.statistics import channel_stats
from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.device import seeded_generator
from hssl_cli.errors import HsslError, RecipeError
from hssl_cli.evaluate.opening import load_trained_method
from hssl_cli.methods import build_method
from hssl_cli.models.kernels import NeuralTangentKernel, RBFKernel, gram
from hssl_cli.recipe import parse_recipe

KERNEL_RECIPE = """
name: tiny_kernel
seed: 1
data: {dataset: digits, image_size: 8}
augment: {crop_scale: [0.6, 1.0], flip: 0.0, grayscale: 0.0,
          color_jitter: {p: 0.8, brightness: 0.4, contrast: 0.4, saturation: 0.0, hue: 0.0}}
model: {backbone: small_convnet}
method: {name: kernel, kernel: rbf, objective: contrastive, embedding_dim: 8, num_samples: 20,
         augmentations_per_sample: 2, ridge: 1.0e-9}
"""


def _recipe(*overrides: str):
    return parse_recipe(KERNEL_RECIPE, "tiny_kernel.yaml", overrides=list(overrides))


@pytest.fixture(scope="module")
def digits():
    recipe = _recipe()
    train, test = load_split(recipe.data, "train"), load_split(recipe.data, "test")
    mean, std = channel_stats(train.images)
    return train, test, mean.float(), std.float()


def _fit(recipe, digits):
    train, _, mean, std = digits
    torch.manual_seed(recipe.seed)
    method = build_method(recipe, in_channels=1)
    augmenter = Augmenter(recipe.augment, recipe.data.image_size, mean, std)
    metrics = method.fit_closed_form(train.images, augmenter, seeded_generator(torch.device("cpu"), recipe.seed, 1))
    return method.eval(), metrics


@pytest.mark.parametrize("kernel", ["rbf", "random_features", "ntk"])
def test_induced_kernel_equals_the_optimal_gram_and_training_features_equal_their_rows_of_F(digits, kernel):
    method, metrics = _fit(_recipe(f"method.kernel={kernel}"), digits)
    feature_map, representations = method.backbone, method.solution.representations  # F (d, N)
    points = feature_map.support  # exact: the support is every training point, in F's column order
    optimal_gram = representations.T @ representations  # G*
    induced = feature_map.induced_kernel(points, points)
    assert (induced - optimal_gram).norm() / optimal_gram.norm() < 1e-5
    features = feature_map(points)  # float32 (N, d), as probe sees them
    assert torch.allclose(features, representations.T.float(), atol=1e-4 * float(representations.abs().max()))
    assert metrics["fit_relative_error"] < 1e-5


def test_closed_form_loss_is_the_sum_of_the_dropped_graph_eigenvalues(digits):
    method, metrics = _fit(_recipe(), digits)
    views = 3  # the original and two augmentations: each group's clique has eigenvalue 3, n = 20 times
    assert metrics["loss"] == pytest.approx((20 - 8) * views**2, rel=1e-9)
    assert metrics["tied_dimensions"] == 20


def _induced_on(method, images) -> torch.Tensor:
    return method.backbone.induced_kernel(images, images)


@pytest.mark.parametrize("approximation, ranks, largest_error", [
    ("nystrom", (40, 120, 300), 1e-6),          # rank = N points: the exact solution
    ("random_features", (100, 400, 3200), 0.3),  # Monte Carlo: error ~ 1/sqrt(rank)
])
def test_approximations_approach_the_exact_solution_as_the_rank_grows(digits, approximation, ranks, largest_error):
    _, test, mean, std = digits
    held_out = normalize(test.images[:100], mean, std)
    base = ("method.num_samples=100", "method.ridge=1.0e-2", "method.embedding_dim=8")
    exact = _induced_on(_fit(_recipe(*base), digits)[0], held_out)
    errors = []
    for rank in ranks:
        approximate, _ = _fit(_recipe(*base, f"method.approximation={approximation}", f"method.rank={rank}"), digits)
        errors.append(float((_induced_on(approximate, held_out) - exact).norm() / exact.norm()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < largest_error, errors


def test_ntk_is_the_dot_product_of_per_sample_parameter_gradients():
    torch.manual_seed(0)
    recipe = _recipe("method.kernel=ntk")
    kernel = build_method(recipe, in_channels=1).backbone.kernel
    assert isinstance(kernel, NeuralTangentKernel)
    images = torch.randn(3, 1, 8, 8)
    parameters = [parameter.requires_grad_(True) for parameter in kernel.network.parameters()]
    expected = []
    for image in images:
        output = kernel.network(image[None]).flatten() @ kernel.readout
        gradients = torch.autograd.grad(output, parameters)
        expected.append(torch.cat([g.flatten() for g in gradients]))
    expected = torch.stack(expected).double()
    assert torch.allclose(gram(kernel, images), expected @ expected.T, rtol=1e-4)


def test_blockwise_gram_equals_the_one_block_gram():
    kernel = RBFKernel(num_pixels=16, bandwidth=3.0)
    rows, columns = torch.randn(11, 1, 4, 4), torch.randn(7, 1, 4, 4)
    assert torch.allclose(gram(kernel, rows, block_size=3), gram(kernel, rows, block_size=100))
    assert torch.allclose(gram(kernel, rows, columns, block_size=2), gram(kernel, rows, columns, block_size=100))
    assert torch.allclose(gram(kernel, rows, block_size=4), gram(kernel, rows, rows, block_size=5))


@pytest.mark.parametrize("override, message", [
    ("method.embedding_dim=30", "method.embedding_dim=30 exceeds method.num_samples=20"),
    ("method={name: kernel, kernel: ntk, approximation: random_features}", "approximates the rbf kernel"),
    ("method.approximation=nystrom", "method.rank=1024 landmarks exceed the 60 points"),
])
def test_kernel_recipe_mistakes_name_the_key_and_the_fix(override, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(override)


def test_more_originals_than_training_images_is_a_user_error(digits):
    with pytest.raises(HsslError, match="num_samples=5000 exceeds the 1437 training images"):
        _fit(_recipe("method.num_samples=5000"), digits)


def test_pretrain_then_probe_a_kernel_checkpoint_from_the_cli(tmp_path, digits):
    recipe_path = tmp_path / "tiny_kernel.yaml"
    recipe_path.write_text(KERNEL_RECIPE)
    runner = CliRunner()
    overrides = ["--set", "method.num_samples=300", "--set", "method.embedding_dim=32", "--set", "method.ridge=0.01"]
    trained = runner.invoke(app, ["pretrain", str(recipe_path), "--output", str(tmp_path), "--device", "cpu",
                                  *overrides])
    assert trained.exit_code == 0, trained.output
    checkpoint_path = next(tmp_path.glob("tiny_kernel/*/last.safetensors"))
    checkpoint = load_checkpoint(checkpoint_path)
    assert checkpoint.tensors["backbone.support"].shape == (900, 1, 8, 8)
    assert checkpoint.tensors["backbone.coefficients"].shape == (32, 900)
    assert "backbone.kernel.bandwidth" in checkpoint.tensors
    row = json.loads((checkpoint_path.parent / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["fit_seconds"] > 0 and row["points"] == 900

    probed = runner.invoke(app, ["probe", str(checkpoint_path), "--json", "--device", "cpu"])
    assert probed.exit_code == 0, probed.output
    report = json.loads(probed.output)
    assert report["method"] == "kernel" and report["feature_dim"] == 32
    assert report["results"]["linear"]["top1"] > 85 and report["results"]["knn_k20"]["top1"] > 85

    # the checkpoint alone rebuilds the same feature map
    _, test, mean, std = digits
    backbone = load_trained_method(checkpoint, torch.device("cpu")).method.backbone
    images = normalize(test.images[:16], mean, std)
    assert torch.allclose(backbone(images), backbone(images.clone()))
    assert backbone(images).shape == (16, 32)


def test_objective_none_keeps_the_random_features_unreduced(digits):
    method, metrics = _fit(_recipe("method.objective=none", "method.approximation=random_features",
                                   "method.rank=64"), digits)
    _, test, mean, std = digits
    images = normalize(test.images[:16], mean, std)
    assert method.backbone.feature_dim == 64 and metrics["points"] == 60
    with torch.no_grad():
        assert torch.allclose(method.backbone(images).double(), method.backbone.kernel.embed(images), atol=1e-6)
    with pytest.raises(RecipeError, match="objective=none keeps the base kernel's feature map unreduced"):
        _recipe("method.objective=none")
    with pytest.raises(RecipeError, match="approximates the rbf kernel, not 'linear'"):
        _recipe("method.objective=none", "method.approximation=random_features", "method.kernel=linear")


def test_the_exact_kernel_knn_votes_with_the_rbf_kernel_of_the_features_bandwidth(tmp_path, digits):
    """--exact-kernel-knn against a kNN computed by hand with k(x, y) = exp(-|x - y|^2 / 2 sigma^2)."""
    from hssl_cli.evaluate.commands.probe import probe_checkpoint
    from hssl_cli.evaluate.measures.frozen_probes import topk_accuracy

    recipe_path = tmp_path / "tiny_kernel.yaml"
    recipe_path.write_text(KERNEL_RECIPE)
    runner = CliRunner()
    trained = runner.invoke(app, ["pretrain", str(recipe_path), "--output", str(tmp_path), "--device", "cpu",
                                  "--set", "method.objective=none", "--set", "method.approximation=random_features",
                                  "--set", "method.rank=128"])
    assert trained.exit_code == 0, trained.output
    path = next(tmp_path.glob("tiny_kernel/*/last.safetensors"))
    report = probe_checkpoint(path, device_name="cpu", progress=False, cache=False, exact_kernel_knn=True,
                              train_samples=300, test_samples=100)
    checkpoint = load_checkpoint(path)
    sigma = float(checkpoint.tensors["backbone.kernel.bandwidth"])
    train, test, _, _ = digits
    mean, std = checkpoint.tensors["data.mean"], checkpoint.tensors["data.std"]
    generator = torch.Generator().manual_seed(0)
    labeled = torch.arange(len(train.labels))[torch.randperm(len(train.labels), generator=generator)[:300]]
    tested = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))[:100]
    left = normalize(test.images[tested], mean, std).flatten(1).double()
    right = normalize(train.images[labeled], mean, std).flatten(1).double()
    similarity = torch.exp(-torch.cdist(left, right).square() / (2 * sigma**2))
    top, index = similarity.topk(20, dim=1)
    weights = ((top - top[:, :1]) / 0.07).exp().float()
    votes = torch.zeros(100, 10).scatter_add_(1, train.labels[labeled][index], weights)
    expected = topk_accuracy(votes, test.labels[tested])
    assert report["results"]["knn_k20_exact_kernel"]["top1"] == pytest.approx(expected["top1"])
    assert report["results"]["knn_k20_exact_kernel"]["top1"] > 50
    printed = runner.invoke(app, ["probe", str(path), "--exact-kernel-knn", "--device", "cpu"])
    assert printed.exit_code == 0 and "knn_k20_exact_kernel" in printed.output
