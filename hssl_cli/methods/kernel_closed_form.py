"""Closed-form optimal representations of joint-embedding SSL in the kernel regime
(Kiani, Balestriero, Chen, Lloyd, LeCun 2022, "Joint Embedding Self-Supervised Learning in the Kernel Regime").

N points come in n groups of m consecutive views of one original. F in R^{d x N} holds the representations
(column i is f(x_i)); K is the kernel matrix and K_l = K + l I with the ridge l. The augmentation graph A
only links views of the same original, so it is block diagonal with one m x m block per group; L = D - A.

- contrastive (spectral form):   min_F |F^T F - A|_F^2            -> F^T F = G*, the best PSD rank-d approximation of A
- non_contrastive (VICReg-like): min_F tr(F L F^T), F F^T / N = I -> rows of F = sqrt(N) x bottom-d eigenvectors of L
- kernel_pca (baseline, no graph):                               -> F^T F = the best rank-d approximation of K

Every group has the same block, so eigenvalues tie across groups (the rule, not the exception). Among the
optima the kernel picks the one of minimum RKHS norm |W|^2 = tr(F K_l^-1 F^T): inside the tied eigenspace
Q_T, the bottom eigenvectors of Q_T^T K_l^-1 Q_T. The minimum-norm map is f(x) = M k_x with M = F K_l^-1, so
the induced kernel is k*(x, x') = k_x^T K_l^-1 G* K_l^-1 k_x' (= G* on the training points as l -> 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hssl_cli.errors import HsslError

TIE_TOLERANCE = 1e-9  # eigenvalues closer than this (relative to the largest) are tied


def clique_blocks(num_groups: int, views: int, device: torch.device | str = "cpu") -> Tensor:
    """A's blocks (n, m, m): every pair of views of one original is linked, self-loops included."""
    return torch.ones(num_groups, views, views, dtype=torch.float64, device=device)


def laplacian_blocks(adjacency: Tensor) -> Tensor:
    """L = D - A, block by block."""
    return torch.diag_embed(adjacency.sum(dim=2)) - adjacency


def contrastive_loss(representations: Tensor, adjacency: Tensor) -> Tensor:
    """|F^T F - A|_F^2 = |F F^T|^2 - 2 tr(F A F^T) + |A|^2, without forming the N x N matrices."""
    blocks = representations.reshape(representations.shape[0], *adjacency.shape[:2])  # (d, n, m)
    cross = torch.einsum("dgi,gij,dgj->", blocks, adjacency.to(blocks), blocks)
    gram_d = representations @ representations.T
    return gram_d.square().sum() - 2 * cross + adjacency.square().sum().to(blocks)


def non_contrastive_loss(representations: Tensor, adjacency: Tensor) -> Tensor:
    """tr(F L F^T); the whitening constraint F F^T / N = I is kept by the solver or by a retraction."""
    blocks = representations.reshape(representations.shape[0], *adjacency.shape[:2])
    return torch.einsum("dgi,gij,dgj->", blocks, laplacian_blocks(adjacency).to(blocks), blocks)


def kernel_pca_loss(solution: Solution, system: KernelSystem) -> float:
    """|K - F^T F|_F^2 / |K|_F^2: the share of the base kernel a rank-d Gram misses."""
    total = system.frobenius_squared()
    return (total - float(solution.eigenvalues.square().sum())) / total


def rkhs_norm(representations: Tensor, system: KernelSystem) -> float:
    """|W|^2 = tr(F K_l^-1 F^T) of the minimum-norm map with these representations on the training points."""
    return float((representations * system.solve(representations.T).T).sum())


@dataclass
class GroupedColumns:
    """Columns of an N x t matrix, each supported on one group's m rows: column c is `vectors[c]` on the
    rows of group `groups[c]` (eigenvectors of a block-diagonal matrix)."""

    groups: Tensor  # (t,) long
    vectors: Tensor  # (t, m) float64
    num_groups: int

    def combine(self, coefficients: Tensor) -> Tensor:
        """Q @ coefficients: (t, k) -> (N, k)."""
        views = self.vectors.shape[1]
        result = torch.zeros(self.num_groups, views, coefficients.shape[1], dtype=torch.float64,
                             device=coefficients.device)
        result.index_add_(0, self.groups, self.vectors[:, :, None] * coefficients[:, None, :])
        return result.reshape(self.num_groups * views, -1)

    def project(self, rows: Tensor) -> Tensor:
        """Q^T rows: (N, r) -> (t, r)."""
        blocks = rows.reshape(self.num_groups, self.vectors.shape[1], -1)
        return torch.einsum("tm,tmr->tr", self.vectors, blocks[self.groups].double())

    def dense(self) -> Tensor:
        return self.combine(torch.eye(len(self.groups), dtype=torch.float64, device=self.vectors.device))


class KernelSystem:
    """What the solver needs of K_l = K + l I, with l = ridge x mean(diag K)."""

    ridge: float

    def solve(self, right: Tensor) -> Tensor:
        """K_l^-1 right."""
        raise NotImplementedError

    def smoothest(self, columns: GroupedColumns, count: int) -> Tensor:
        """R (t, count): the bottom eigenvectors of Q^T K_l^-1 Q (orthonormal Q), smallest first."""
        raise NotImplementedError

    def principal(self, count: int) -> tuple[Tensor, Tensor]:
        """Top eigenpairs of K (largest first): eigenvalues (count,), eigenvectors (N, count)."""
        raise NotImplementedError

    def coefficients(self, representations: Tensor) -> Tensor:
        """The map from the kernel's basis to F: M = F K_l^-1 over the points, or W over features."""
        raise NotImplementedError

    def frobenius_squared(self) -> float:
        """|K|_F^2 (kernel_pca's loss is the part of it a rank-d Gram misses)."""
        raise NotImplementedError


class ExactSystem(KernelSystem):
    """The full N x N kernel matrix, one Cholesky factorisation (float64)."""

    def __init__(self, kernel_matrix: Tensor, ridge: float):
        self.kernel_matrix = kernel_matrix
        self.ridge = ridge * float(kernel_matrix.diagonal().mean())
        kernel_matrix.diagonal().add_(self.ridge)  # in place: an N x N copy is what limits N
        try:
            self.factor = torch.linalg.cholesky(kernel_matrix)
        finally:
            kernel_matrix.diagonal().sub_(self.ridge)

    def solve(self, right: Tensor) -> Tensor:
        return torch.cholesky_solve(right, self.factor)

    def smoothest(self, columns: GroupedColumns, count: int) -> Tensor:
        basis = columns.dense()
        quadratic = basis.T @ self.solve(basis)
        return torch.linalg.eigh((quadratic + quadratic.T) / 2).eigenvectors[:, :count]

    def principal(self, count: int) -> tuple[Tensor, Tensor]:
        eigenvalues, eigenvectors = torch.linalg.eigh(self.kernel_matrix)
        return eigenvalues.flip(0)[:count], eigenvectors.flip(1)[:, :count]

    def coefficients(self, representations: Tensor) -> Tensor:
        return self.solve(representations.T).T  # M = F K_l^-1 (K_l symmetric)

    def frobenius_squared(self) -> float:
        return float(self.kernel_matrix.square().sum())


class LowRankSystem(KernelSystem):
    """K ~ Phi Phi^T with r features per point (Nystroem or random features). With G = Phi^T Phi + l I:
    K_l^-1 = (I - Phi G^-1 Phi^T) / l (Woodbury), and M = F K_l^-1 acts on k_x = Phi phi(x) as
    W phi(x) with W = F Phi G^-1, so only r x r systems are solved."""

    def __init__(self, features: Tensor, ridge: float):
        self.features = features.double()
        self.ridge = ridge * float(self.features.square().sum() / len(self.features))
        inner = self.features.T @ self.features
        self.inner = inner
        self.factor = torch.linalg.cholesky(inner + self.ridge * torch.eye(len(inner), dtype=torch.float64,
                                                                           device=inner.device))

    def solve(self, right: Tensor) -> Tensor:
        inner_solved = torch.cholesky_solve(self.features.T @ right, self.factor)
        return (right - self.features @ inner_solved) / self.ridge

    def smoothest(self, columns: GroupedColumns, count: int) -> Tensor:
        # bottom of (I - P G^-1 P^T) / l  <=>  top of H H^T with H = P L_G^-T (P = Q^T Phi, G = L_G L_G^T)
        whitened = torch.linalg.solve_triangular(self.factor, columns.project(self.features).T, upper=False).T
        if whitened.shape[0] <= whitened.shape[1]:
            eigenvectors = torch.linalg.eigh(whitened @ whitened.T).eigenvectors
            return eigenvectors.flip(1)[:, :count]
        eigenvalues, right_vectors = torch.linalg.eigh(whitened.T @ whitened)  # r x r: cheaper when t > r
        top_values, top_vectors = eigenvalues.flip(0)[:count], right_vectors.flip(1)[:, :count]
        if count > len(eigenvalues) or bool(top_values[-1] <= 0):
            raise HsslError(f"method.rank={len(eigenvalues)}: the tie-break needs {count} directions but the "
                            f"features span {int((eigenvalues > 0).sum())}; raise method.rank")
        return whitened @ top_vectors / top_values.sqrt()

    def principal(self, count: int) -> tuple[Tensor, Tensor]:
        eigenvalues, right_vectors = torch.linalg.eigh(self.inner)
        top_values, top_vectors = eigenvalues.flip(0)[:count], right_vectors.flip(1)[:, :count]
        return top_values, self.features @ top_vectors / top_values.clamp_min(1e-300).sqrt()

    def coefficients(self, representations: Tensor) -> Tensor:
        return torch.cholesky_solve((representations @ self.features).T, self.factor).T  # W = F Phi G^-1

    def frobenius_squared(self) -> float:
        return float(self.inner.square().sum())  # |Phi Phi^T|_F = |Phi^T Phi|_F


@dataclass
class Solution:
    representations: Tensor  # F (d, N), float64
    eigenvalues: Tensor  # (d,) the graph's (or K's) eigenvalue behind each row of F
    tied: int  # size of the tied eigenspace the kernel chose from (0: no choice was made)


def optimal_representations(adjacency: Tensor, system: KernelSystem, dimension: int, objective: str) -> Solution:
    """The minimum-norm optimum F of `objective` over the block-diagonal graph (or of K for kernel_pca)."""
    if objective == "kernel_pca":
        eigenvalues, eigenvectors = system.principal(dimension)
        return Solution(eigenvectors.T * eigenvalues.clamp_min(0).sqrt()[:, None], eigenvalues, 0)
    num_groups, views, _ = adjacency.shape
    contrastive = objective == "contrastive"
    matrix = adjacency if contrastive else laplacian_blocks(adjacency)
    block_values, block_vectors = torch.linalg.eigh(matrix.double())  # all n x m eigenpairs, batched
    values, vectors = block_values.flatten(), block_vectors.transpose(1, 2).reshape(-1, views)
    groups = torch.arange(num_groups, device=adjacency.device).repeat_interleave(views)
    score = -values if contrastive else values  # smaller is better
    tolerance = TIE_TOLERANCE * float(values.abs().max().clamp_min(1.0))
    if contrastive:  # G* keeps positive eigenvalues only; fewer than d leaves rows of F at zero
        usable = values > tolerance
        score = torch.where(usable, score, torch.inf)
    order = score.argsort(stable=True)
    available = int(torch.isfinite(score).sum())
    boundary = score[order[min(dimension, available) - 1]] if available else torch.inf
    strict = order[score[order] < boundary - tolerance]
    tied = order[(score[order] - boundary).abs() <= tolerance] if available else order[:0]
    needed = min(dimension, available) - len(strict)

    def columns(index: Tensor) -> GroupedColumns:
        return GroupedColumns(groups[index], vectors[index], num_groups)

    basis = [columns(strict).dense()]
    if needed == len(tied) and needed > 0:  # the whole tied eigenspace is taken: nothing to choose
        basis.append(columns(tied).dense())
    elif needed > 0:
        basis.append(columns(tied).combine(system.smoothest(columns(tied), needed)))
    basis_matrix = torch.cat(basis, dim=1)  # (N, <= d) orthonormal columns
    row_values = torch.cat([values[strict], values[tied[:1]].expand(max(needed, 0))])
    if contrastive:
        scale = row_values.clamp_min(0).sqrt()
    else:
        scale = torch.full_like(row_values, math.sqrt(num_groups * views))
    representations = torch.zeros(dimension, num_groups * views, dtype=torch.float64, device=adjacency.device)
    representations[:basis_matrix.shape[1]] = basis_matrix.T * scale[:, None]
    eigenvalues = torch.zeros(dimension, dtype=torch.float64, device=adjacency.device)
    eigenvalues[:len(row_values)] = row_values
    return Solution(representations, eigenvalues, len(tied) if 0 < needed < len(tied) else 0)
