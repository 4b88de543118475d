"""Kernel-regime SSL (Kiani, Balestriero, Chen, Lloyd, LeCun 2022): representations f(x) = W phi(x) in a
kernel's feature space, solved in closed form (eigh) instead of by SGD.

fit_closed_form draws num_samples originals, puts each with its views in a group (the augmentation graph
links the views of one original), builds the kernel matrix K (exact, Nystroem or random Fourier
features), takes the minimum-norm optimum F of the objective (kernel_closed_form.py) and stores
F(x) = M k_x as the backbone: support points, M and the kernel's parameters, so `probe`,
`collapse-report` and `equivariance-check` use it like a network.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from hssl_cli.data.augment import normalize
from hssl_cli.errors import HsslError
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.kernel_closed_form import (
    ExactSystem,
    KernelSystem,
    LowRankSystem,
    Solution,
    clique_blocks,
    contrastive_loss,
    kernel_pca_loss,
    non_contrastive_loss,
    optimal_representations,
    rkhs_norm,
)
from hssl_cli.models.capabilities import BackboneCapabilities
from hssl_cli.models.kernels import (
    Kernel,
    LinearKernel,
    NetworkFeatureKernel,
    NeuralTangentKernel,
    RandomFourierFeatures,
    RBFKernel,
    gram,
    nystrom_features,
)
from hssl_cli.recipe import KernelConfig, Recipe

MEGABYTE = 2**20


class KernelFeatureMap(nn.Module):
    """F(x) = M k_x with k_x = [k(s_j, x)]_j over the support points s_j (exact: every training point;
    nystrom: the landmarks), or F(x) = W phi(x) for random Fourier features (no support points).
    Takes normalised images (B, C, H, W), returns float32 (B, d); computed in float64 because M of a
    small ridge has large entries that cancel."""

    def __init__(self, kernel: Kernel, image_shape: tuple[int, int, int], num_support: int, num_basis: int,
                 embedding_dim: int, block_size: int):
        super().__init__()
        self.kernel = kernel
        self.register_buffer("support", torch.zeros(num_support, *image_shape))
        self.register_buffer("coefficients", torch.zeros(embedding_dim, num_basis, dtype=torch.float64))
        self.block_size = block_size
        self.feature_dim = embedding_dim
        self.capabilities = BackboneCapabilities()  # no fibres, no map, no library twin

    def basis(self, images: Tensor) -> Tensor:
        """k_x (B, support) or phi(x) (B, features), float64."""
        if len(self.support):
            return gram(self.kernel, images, self.support, self.block_size)
        return torch.cat([self.kernel.embed(chunk).double() for chunk in images.split(self.block_size)])

    def represent(self, images: Tensor) -> Tensor:
        return self.basis(images) @ self.coefficients.T

    def induced_kernel(self, left: Tensor, right: Tensor) -> Tensor:
        """k*(x, x') = k_x^T K^-1 G* K^-1 k_x' = F(x) . F(x'), float64 (len(left), len(right))."""
        return self.represent(left) @ self.represent(right).T

    def forward(self, images: Tensor) -> Tensor:
        return self.represent(images).float()


def build_kernel(config: KernelConfig, backbone: str, in_channels: int, image_size: int) -> Kernel:
    from hssl_cli.models.backbones import build_backbone

    pixels = in_channels * image_size**2
    if config.approximation == "random_features":
        return RandomFourierFeatures(pixels, config.rank, config.bandwidth)
    if config.kernel == "rbf":
        return RBFKernel(pixels, config.bandwidth)
    if config.kernel == "linear":
        return LinearKernel(pixels)
    network = build_backbone(backbone, in_channels)
    return NetworkFeatureKernel(network) if config.kernel == "random_features" else NeuralTangentKernel(network)


class KernelMethod(SSLMethod):
    closed_form = True

    def __init__(self, recipe: Recipe, in_channels: int):
        config = recipe.method
        size = recipe.data.image_size
        points = config.num_samples * config.views
        num_support = {"exact": points, "nystrom": config.rank, "random_features": 0}[config.approximation]
        num_basis = num_support or config.rank
        kernel = build_kernel(config, recipe.model.backbone, in_channels, size)
        super().__init__(KernelFeatureMap(kernel, (in_channels, size, size), num_support, num_basis,
                                          config.representation_dim, config.block_size))
        self.config = config
        self.solution: Solution | None = None  # the last fit's optimum F on its training points (not saved)

    @classmethod
    def from_recipe(cls, recipe: Recipe, in_channels: int) -> KernelMethod:
        return cls(recipe, in_channels)  # sized by the data (support points, pixels), not by a backbone

    def training_points(self, images: Tensor, augmenter, generator: torch.Generator) -> Tensor:
        """num_samples originals x views, group-major: point g * views + j is view j of original g."""
        config = self.config
        if config.num_samples > len(images):
            raise HsslError(f"method.num_samples={config.num_samples} exceeds the {len(images)} training images; "
                            f"lower it to at most {len(images)}")
        chosen = torch.randperm(len(images), generator=generator, device=images.device)[:config.num_samples]
        originals = images[chosen]
        views = [normalize(originals, augmenter.mean, augmenter.std)] if config.include_original else []
        views += [augmenter(originals, generator) for _ in range(config.augmentations_per_sample)]
        return torch.stack(views, dim=1).flatten(0, 1)

    def fit_closed_form(self, images: Tensor, augmenter, generator: torch.Generator) -> dict[str, float]:
        config, feature_map = self.config, self.backbone
        points = self.training_points(images, augmenter, generator)
        started = time.perf_counter()
        feature_map.kernel.prepare(points)
        if config.objective == "none":  # F(x) = phi(x): nothing to solve (the points set the bandwidth only)
            feature_map.coefficients.copy_(torch.eye(config.rank, dtype=torch.float64))
            return {"loss": 0.0, "points": float(len(points)), "kernel_seconds": time.perf_counter() - started,
                    "bandwidth": float(feature_map.kernel.bandwidth)}
        system, support, fold, held_bytes = self._kernel_system(points, generator)
        kernel_done = time.perf_counter()
        adjacency = clique_blocks(config.num_samples, config.views, points.device)
        solution = optimal_representations(adjacency, system, config.embedding_dim, config.objective)
        self.solution, representations = solution, solution.representations
        coefficients = system.coefficients(representations)
        feature_map.support.copy_(support)
        feature_map.coefficients.copy_(fold(coefficients))
        solved = time.perf_counter()
        if config.objective == "kernel_pca":
            loss = kernel_pca_loss(solution, system)
        else:
            objective = contrastive_loss if config.objective == "contrastive" else non_contrastive_loss
            loss = float(objective(representations, adjacency))
        fitted = self._training_features(system, coefficients)
        metrics = {
            "loss": loss,
            "rkhs_norm": rkhs_norm(representations, system),
            "fit_relative_error": float((fitted - representations).norm() / representations.norm()),
            "points": float(len(points)),
            "tied_dimensions": float(solution.tied),
            "ridge_lambda": system.ridge,  # absolute: method.ridge x mean(diag K)
            "kernel_seconds": kernel_done - started,
            "eigensolve_seconds": solved - kernel_done,
            "held_megabytes": held_bytes / MEGABYTE,
        }
        if isinstance(feature_map.kernel, (RBFKernel, RandomFourierFeatures)):  # the kernels with a bandwidth
            metrics["bandwidth"] = float(feature_map.kernel.bandwidth)
        return metrics

    def _kernel_system(self, points: Tensor, generator: torch.Generator):
        """(system, support points, fold: system coefficients -> the feature map's, bytes of the big matrices)."""
        config, kernel = self.config, self.backbone.kernel
        no_support = points[:0]
        if config.approximation == "exact":
            kernel_matrix = gram(kernel, points, block_size=config.block_size)
            # K plus its Cholesky factor; kernel_pca's eigh holds a third N x N matrix
            held = kernel_matrix.numel() * 8 * (3 if config.objective == "kernel_pca" else 2)
            return ExactSystem(kernel_matrix, config.ridge), points, _identity, held
        if config.approximation == "nystrom":
            chosen = torch.randperm(len(points), generator=generator, device=points.device)[:config.rank]
            features, projection = nystrom_features(kernel, points, points[chosen], config.block_size)
            held = (features.numel() + 2 * features.shape[1] ** 2 + len(chosen) ** 2) * 8
            return LowRankSystem(features, config.ridge), points[chosen], lambda weights: weights @ projection.T, held
        features = torch.cat([kernel.embed(chunk) for chunk in points.split(config.block_size)])
        held = (features.numel() + 2 * features.shape[1] ** 2) * 8
        return LowRankSystem(features, config.ridge), no_support, _identity, held

    @staticmethod
    def _training_features(system: KernelSystem, coefficients: Tensor) -> Tensor:
        """F(x_i) of the training points as the fitted map gives them (F K_l^-1 K: F as the ridge -> 0)."""
        if isinstance(system, ExactSystem):
            return coefficients @ system.kernel_matrix
        return coefficients @ system.features.T


def _identity(coefficients: Tensor) -> Tensor:
    return coefficients
