"""The closed-form optimum of kernel-regime SSL against gradient descent on the same objectives."""

import math

import pytest
import torch

from hssl_cli.methods.kernel_closed_form import (
    ExactSystem,
    LowRankSystem,
    clique_blocks,
    contrastive_loss,
    laplacian_blocks,
    non_contrastive_loss,
    optimal_representations,
    rkhs_norm,
)

GROUPS, VIEWS, DIMENSION = 6, 3, 4
POINTS = GROUPS * VIEWS


def _random_graph(seed: int) -> torch.Tensor:
    """Symmetric non-negative weights inside each group: distinct eigenvalues, so a unique optimum."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(GROUPS, VIEWS, VIEWS, generator=generator, dtype=torch.float64)
    return (weights + weights.transpose(1, 2)) / 2


def _features(seed: int, width: int = 40) -> torch.Tensor:
    """phi(x_i) of N points with more features than points, so K = Phi Phi^T is invertible and any F is reachable."""
    return torch.randn(POINTS, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _descend(loss_of_weights, width: int, seed: int, dimension: int = DIMENSION, steps: int = 400) -> torch.Tensor:
    """W (d, p) minimising loss_of_weights(W) from a random start, by L-BFGS (full-batch gradient descent)."""
    weights = torch.randn(dimension, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of_weights(weights)
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def _whitened(representations: torch.Tensor) -> torch.Tensor:
    """sqrt(N) x an orthonormal basis of the rows: a differentiable retraction onto F F^T / N = I."""
    basis, _ = torch.linalg.qr(representations.T)
    return math.sqrt(representations.shape[1]) * basis.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_closed_form_matches_gradient_descent_where_the_optimum_is_unique(seed):
    adjacency, features = _random_graph(seed), _features(seed)
    system = ExactSystem(features @ features.T, ridge=1e-12)
    closed = optimal_representations(adjacency, system, DIMENSION, "contrastive").representations
    weights = _descend(lambda w: contrastive_loss(w @ features.T, adjacency), features.shape[1], seed + 10)
    descended = weights @ features.T
    closed_loss, descended_loss = contrastive_loss(closed, adjacency), contrastive_loss(descended, adjacency)
    assert closed_loss <= descended_loss + 1e-9
    assert torch.allclose(closed_loss, descended_loss, rtol=1e-6)
    assert torch.allclose(closed.T @ closed, descended.T @ descended, atol=1e-5)  # G* is unique here


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_contrastive_closed_form_matches_gradient_descent_where_the_optimum_is_unique(seed):
    # Every group's Laplacian has the constant null vector, so the bottom GROUPS eigenvalues tie at 0;
    # d = GROUPS + 2 takes all of them plus two distinct ones: a unique optimal row space.
    adjacency, features, dimension = _random_graph(seed), _features(seed), GROUPS + 2
    system = ExactSystem(features @ features.T, ridge=1e-12)
    closed = optimal_representations(adjacency, system, dimension, "non_contrastive").representations
    assert torch.allclose(closed @ closed.T / POINTS, torch.eye(dimension, dtype=torch.float64), atol=1e-10)
    weights = _descend(lambda w: non_contrastive_loss(_whitened(w @ features.T), adjacency), features.shape[1], seed,
                       dimension)
    descended = _whitened(weights @ features.T)
    closed_loss, descended_loss = non_contrastive_loss(closed, adjacency), non_contrastive_loss(descended, adjacency)
    assert closed_loss <= descended_loss + 1e-9
    assert torch.allclose(closed_loss, descended_loss, atol=1e-7)
    # the optimal row space (bottom-d eigenvectors of L) is unique here: equal projections
    assert torch.allclose(closed.T @ closed / POINTS, descended.T @ descended / POINTS, atol=1e-5)


@pytest.mark.parametrize("objective", ["contrastive", "non_contrastive"])
def test_ties_of_the_augmentation_graph_are_broken_by_the_minimum_rkhs_norm(objective):
    adjacency = clique_blocks(GROUPS, VIEWS)  # every group has the same spectrum: a GROUPS-fold tie
    points = torch.randn(POINTS, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    system = ExactSystem(torch.exp(-torch.cdist(points, points).square() / 10), ridge=1e-9)
    loss = contrastive_loss if objective == "contrastive" else non_contrastive_loss
    solution = optimal_representations(adjacency, system, DIMENSION, objective)
    closed = solution.representations
    assert solution.tied == GROUPS
    closed_norm = rkhs_norm(closed, system)
    # Any other d-dimensional subspace of the tied eigenspace (group indicators) is as optimal but costlier.
    indicators = torch.eye(GROUPS, dtype=torch.float64).repeat_interleave(VIEWS, dim=0) / math.sqrt(VIEWS)
    scale = math.sqrt(VIEWS) if objective == "contrastive" else math.sqrt(POINTS)
    for seed in range(5):
        mixing, _ = torch.linalg.qr(torch.randn(GROUPS, DIMENSION, generator=torch.Generator().manual_seed(seed),
                                                dtype=torch.float64))
        other = scale * (indicators @ mixing).T
        assert torch.allclose(loss(other, adjacency), loss(closed, adjacency), atol=1e-8)
        assert rkhs_norm(other, system) > closed_norm


def test_contrastive_and_non_contrastive_pick_the_same_subspace_on_an_augmentation_graph():
    adjacency = clique_blocks(GROUPS, VIEWS)
    system = LowRankSystem(_features(3, width=12), ridge=1e-3)
    contrastive = optimal_representations(adjacency, system, DIMENSION, "contrastive").representations
    non_contrastive = optimal_representations(adjacency, system, DIMENSION, "non_contrastive").representations
    assert torch.allclose(contrastive.T @ contrastive / VIEWS, non_contrastive.T @ non_contrastive / POINTS,
                          atol=1e-10)


def test_low_rank_system_equals_the_exact_one_on_the_same_kernel_matrix():
    features, adjacency = _features(4, width=10), clique_blocks(GROUPS, VIEWS)  # K = Phi Phi^T has rank 10 < N
    exact, low_rank = ExactSystem(features @ features.T, 1e-2), LowRankSystem(features, 1e-2)
    right = torch.randn(POINTS, 3, dtype=torch.float64)
    assert torch.allclose(exact.solve(right), low_rank.solve(right), rtol=1e-8, atol=1e-8)
    for objective in ("contrastive", "non_contrastive", "kernel_pca"):
        one = optimal_representations(adjacency, exact, DIMENSION, objective).representations
        two = optimal_representations(adjacency, low_rank, DIMENSION, objective).representations
        assert torch.allclose(one.T @ one, two.T @ two, atol=1e-6), objective
        # the same map up to a rotation of F's rows: M k_x = (M Phi) phi(x) (exact) against W phi(x) (low rank)
        exact_weights, low_rank_weights = exact.coefficients(one) @ features, low_rank.coefficients(two)
        assert torch.allclose(exact_weights.T @ exact_weights, low_rank_weights.T @ low_rank_weights,
                              atol=1e-6), objective


def test_kernel_pca_is_the_best_rank_d_approximation_of_the_kernel_matrix():
    features = _features(5)
    kernel_matrix = features @ features.T
    solution = optimal_representations(clique_blocks(GROUPS, VIEWS), ExactSystem(kernel_matrix, 1e-6), DIMENSION,
                                       "kernel_pca")
    gram = solution.representations.T @ solution.representations
    eigenvalues = torch.linalg.eigvalsh(kernel_matrix)
    assert torch.allclose((kernel_matrix - gram).square().sum(), eigenvalues[:-DIMENSION].square().sum())


def test_laplacian_of_a_clique_has_the_group_indicators_as_null_space():
    laplacian = laplacian_blocks(clique_blocks(2, 3))
    assert torch.allclose(laplacian[0] @ torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(torch.linalg.eigvalsh(laplacian[0]), torch.tensor([0.0, 3.0, 3.0], dtype=torch.float64))
