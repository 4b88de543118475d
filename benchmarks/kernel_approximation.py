"""Error of the Nystroem and random-feature approximations against the exact kernel-regime solution, on a
size where the exact N x N solve still runs, with solve times.

    .venv/bin/python benchmarks/kernel_approximation.py recipes/kernel_mnist_rff.yaml --num-samples 1500

Every fit uses the recipe with `--set`-style changes (same seed, so the same points and bandwidth); the
error is |k*_approx - k*_exact|_F / |k*_exact|_F of the induced kernel k*(x, x') = F(x) . F(x') on
`--held-out` test images (rotation-free: F is defined up to an orthogonal map of its rows), and the
kernel's own error |K_approx - K|_F / |K|_F on the training points.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from hssl_cli.data.augment import Augmenter, normalize
from hssl_cli.data.sources import load_split
from hssl_cli.data.statistics import channel_stats
from hssl_cli.engine.device import seeded_generator
from hssl_cli.methods import build_method
from hssl_cli.models.kernels import RBFKernel, gram
from hssl_cli.recipe import load_recipe


def fit(recipe_path: str, overrides: list[str], images: torch.Tensor, augmenter: Augmenter):
    recipe = load_recipe(recipe_path, overrides)
    torch.manual_seed(recipe.seed)
    method = build_method(recipe, in_channels=images.shape[1])
    started = time.perf_counter()
    metrics = method.fit_closed_form(images, augmenter, seeded_generator(images.device, recipe.seed, 1))
    return method.eval(), metrics, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--num-samples", type=int, default=1500)
    parser.add_argument("--views", type=int, default=2, help="originals' views, the original included")
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--nystrom", type=int, nargs="*", default=[256, 1024, 2048])
    parser.add_argument("--random-features", type=int, nargs="*", default=[256, 1024, 4096])
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    train, test = load_split(recipe.data, "train"), load_split(recipe.data, "test")
    mean, std = (stat.float() for stat in channel_stats(train.images))
    augmenter = Augmenter(recipe.augment, recipe.data.image_size, mean, std)
    held_out = normalize(test.images[:args.held_out], mean, std)
    base = [f"method.num_samples={args.num_samples}", f"method.augmentations_per_sample={args.views - 1}",
            "method.include_original=true", "method.approximation=exact"]

    exact, exact_metrics, exact_seconds = fit(args.recipe, base, train.images, augmenter)
    exact_induced = exact.backbone.induced_kernel(held_out, held_out)
    points = exact.backbone.support
    rbf = RBFKernel(points[0].numel(), float(exact_metrics["bandwidth"]))
    exact_kernel = gram(rbf, points)

    table = Table(title=f"{recipe.name}: {int(exact_metrics['points'])} points, d={recipe.method.embedding_dim}, "
                  f"{recipe.method.objective}, ridge {recipe.method.ridge:g}")
    for column in ("approximation", "rank", "induced-kernel error", "K error", "fit s", "held MB"):
        table.add_column(column, justify="right")
    table.add_row("exact", str(len(points)), "0", "0", f"{exact_seconds:.1f}", f"{exact_metrics['held_megabytes']:.0f}")
    for approximation, ranks in (("nystrom", args.nystrom), ("random_features", args.random_features)):
        for rank in ranks:
            method, metrics, seconds = fit(args.recipe, [*base, f"method.approximation={approximation}",
                                                         f"method.rank={rank}"], train.images, augmenter)
            induced = method.backbone.induced_kernel(held_out, held_out)
            error = float((induced - exact_induced).norm() / exact_induced.norm())
            features = _kernel_features(method, points)
            kernel_error = float((features @ features.T - exact_kernel).norm() / exact_kernel.norm())
            table.add_row(approximation, str(rank), f"{error:.3f}", f"{kernel_error:.3f}", f"{seconds:.1f}",
                          f"{metrics['held_megabytes']:.0f}")
    Console().print(table)


def _kernel_features(method, points: torch.Tensor) -> torch.Tensor:
    """phi(x) of the approximation on the training points: K_approx = phi phi^T."""
    from hssl_cli.models.kernels import nystrom_features

    feature_map = method.backbone
    if len(feature_map.support):  # nystrom: the support points are the landmarks
        return nystrom_features(feature_map.kernel, points, feature_map.support, 512)[0]
    return feature_map.basis(points)


if __name__ == "__main__":
    main()
