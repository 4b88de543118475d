"""Kernels on images for kernel-regime SSL: RBF, linear, random Fourier features, a random network's
features (conjugate kernel) and its empirical neural tangent kernel, plus the Nystroem feature map.

A kernel is split in two so that big Gram matrices can be built block by block: `embed` maps a batch of
normalised images (B, C, H, W) to what `pair` needs of each point (pixels, features, Jacobians), and
`pair` turns two embedded blocks into float64 kernel values. Kernels with `explicit = True` are
dot products of their embeddings, k(x, y) = embed(x) . embed(y), so `embed` is a feature map phi.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CACHE_BYTES = 256 * 2**20  # embeddings of the column points are kept when they fit in this; else recomputed
MEDIAN_POINTS = 1000  # points whose pairwise distances give the median-heuristic bandwidth


class Kernel(nn.Module):
    explicit = False

    def __init__(self, embedding_width: int):
        super().__init__()
        self.embedding_width = embedding_width  # floats per embedded point: sizes the blocks of `gram`

    def embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def pair(self, left: Tensor, right: Tensor) -> Tensor:
        return (left @ right.T).double()

    def prepare(self, points: Tensor) -> None:
        """Set data-dependent parameters (e.g. a bandwidth) from the support points before a solve."""


def gram(kernel: Kernel, rows: Tensor, columns: Tensor | None = None, block_size: int = 1024) -> Tensor:
    """k(rows_i, columns_j) as float64 (len(rows), len(columns)); columns=None: the symmetric K of rows.

    Evaluated in blocks of at most block_size points (fewer when a block's embeddings would exceed
    CACHE_BYTES, e.g. NTK Jacobians), so besides the result only two embedded blocks live in memory;
    the column embeddings are computed once when they all fit in CACHE_BYTES. The symmetric case
    computes the upper block triangle and mirrors it.
    """
    symmetric = columns is None
    columns = rows if symmetric else columns
    block_size = max(1, min(block_size, CACHE_BYTES // (4 * kernel.embedding_width)))
    result = torch.empty(len(rows), len(columns), dtype=torch.float64, device=rows.device)
    column_starts = range(0, len(columns), block_size)
    cached = None
    if len(columns) * kernel.embedding_width * 4 <= CACHE_BYTES:
        cached = [kernel.embed(columns[start:start + block_size]) for start in column_starts]

    def column_block(index: int) -> Tensor:
        start = column_starts[index]
        return cached[index] if cached is not None else kernel.embed(columns[start:start + block_size])

    for row_index, row_start in enumerate(range(0, len(rows), block_size)):
        rows_embedded = column_block(row_index) if symmetric else kernel.embed(rows[row_start:row_start + block_size])
        row_stop = row_start + len(rows_embedded)
        for column_index, column_start in enumerate(column_starts):
            if symmetric and column_index < row_index:
                continue
            columns_embedded = rows_embedded if symmetric and column_index == row_index else column_block(column_index)
            values = kernel.pair(rows_embedded, columns_embedded)
            column_stop = column_start + len(columns_embedded)
            result[row_start:row_stop, column_start:column_stop] = values
            if symmetric and column_index > row_index:
                result[column_start:column_stop, row_start:row_stop] = values.T
    return result


def _flat(images: Tensor) -> Tensor:
    return images.flatten(1).double()


class RBFKernel(Kernel):
    """k(x, y) = exp(-|x - y|^2 / (2 sigma^2)) on pixels; sigma from the recipe or the median heuristic."""

    def __init__(self, num_pixels: int, bandwidth: float | None):
        super().__init__(num_pixels)
        self.fixed_bandwidth = bandwidth
        self.register_buffer("bandwidth", torch.tensor(bandwidth or 1.0, dtype=torch.float64))

    def embed(self, images: Tensor) -> Tensor:
        return _flat(images)

    def pair(self, left: Tensor, right: Tensor) -> Tensor:
        squared = torch.cdist(left, right).square()
        return torch.exp(-squared / (2 * self.bandwidth**2))

    def prepare(self, points: Tensor) -> None:
        if self.fixed_bandwidth is None:
            self.bandwidth.fill_(median_distance(points))


def median_distance(points: Tensor) -> float:
    """Median pairwise distance of (up to MEDIAN_POINTS evenly spaced) points: the usual RBF bandwidth."""
    step = max(1, len(points) // MEDIAN_POINTS)
    sample = _flat(points[::step][:MEDIAN_POINTS])
    distances = torch.pdist(sample)
    return float(distances.median()) if distances.numel() else 1.0


class LinearKernel(Kernel):
    """k(x, y) = x . y / p on the p pixels (the 1/p keeps k(x, x) of order one)."""

    explicit = True

    def __init__(self, num_pixels: int):
        super().__init__(num_pixels)

    def embed(self, images: Tensor) -> Tensor:
        return _flat(images) / math.sqrt(self.embedding_width)


class RandomFourierFeatures(Kernel):
    """phi(x) = sqrt(2/r) cos(omega x / sigma + b), omega ~ N(0, I), b ~ U[0, 2 pi): E[phi(x).phi(y)] is
    the RBF kernel of bandwidth sigma (Rahimi & Recht 2007). omega and b are drawn at construction
    (from torch's seeded global generator); sigma like RBFKernel's."""

    explicit = True

    def __init__(self, num_pixels: int, rank: int, bandwidth: float | None):
        super().__init__(rank)
        self.fixed_bandwidth = bandwidth
        self.register_buffer("bandwidth", torch.tensor(bandwidth or 1.0, dtype=torch.float64))
        self.register_buffer("frequencies", torch.randn(rank, num_pixels, dtype=torch.float64))
        self.register_buffer("phases", torch.rand(rank, dtype=torch.float64) * 2 * math.pi)

    def embed(self, images: Tensor) -> Tensor:
        projected = _flat(images) @ self.frequencies.T / self.bandwidth
        return math.sqrt(2 / self.embedding_width) * torch.cos(projected + self.phases)

    def prepare(self, points: Tensor) -> None:
        if self.fixed_bandwidth is None:
            self.bandwidth.fill_(median_distance(points))


def exact_kernel(kernel: Kernel) -> Kernel:
    """The kernel a checkpoint's feature map stands for, evaluated exactly: the RBF kernel of the same bandwidth
    for random Fourier features, the kernel itself for rbf and linear."""
    if isinstance(kernel, RandomFourierFeatures):
        exact = RBFKernel(kernel.frequencies.shape[1], float(kernel.bandwidth))
        return exact.to(kernel.bandwidth.device)
    if isinstance(kernel, RBFKernel | LinearKernel):
        return kernel
    raise ValueError(f"{type(kernel).__name__} has no exact form to evaluate on pixels")


class _NetworkKernel(Kernel):
    """A fixed, randomly initialised network; BatchNorm keeps its initial statistics (eval mode) so the
    kernel is a function of single points, whatever mode the surrounding model is in."""

    explicit = True

    def __init__(self, network: nn.Module, embedding_width: int):
        super().__init__(embedding_width)
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> _NetworkKernel:
        super().train(mode)
        self.network.eval()
        return self


class NetworkFeatureKernel(_NetworkKernel):
    """Random features of a network at initialisation: k(x, y) = f(x) . f(y) / D (the conjugate kernel)."""

    def __init__(self, network: nn.Module):
        super().__init__(network, network.feature_dim)

    def embed(self, images: Tensor) -> Tensor:
        return self.network(images).flatten(1).double() / math.sqrt(self.embedding_width)


class NeuralTangentKernel(_NetworkKernel):
    """Empirical NTK k(x, y) = grad_theta h(x) . grad_theta h(y) of h(x) = v . f_theta(x) at initialisation,
    with a fixed random readout v ~ N(0, I/D): E_v of it is the trace NTK of f divided by D, at one
    backward pass per point instead of D. Per-point gradients come from torch.func (vmap of grad)."""

    def __init__(self, network: nn.Module):
        num_parameters = sum(parameter.numel() for parameter in network.parameters())
        super().__init__(network, num_parameters)
        self.register_buffer("readout", torch.randn(network.feature_dim) / math.sqrt(network.feature_dim))

    def embed(self, images: Tensor) -> Tensor:
        from torch.func import functional_call, grad, vmap

        parameters = {name: parameter.detach() for name, parameter in self.network.named_parameters()}
        buffers = dict(self.network.named_buffers())

        def output(params: dict[str, Tensor], image: Tensor) -> Tensor:
            features = functional_call(self.network, (params, buffers), (image.unsqueeze(0),))
            return features.flatten() @ self.readout

        gradients = vmap(grad(output), in_dims=(None, 0))(parameters, images)
        return torch.cat([gradient.flatten(1) for gradient in gradients.values()], dim=1)

    def pair(self, left: Tensor, right: Tensor) -> Tensor:
        return (left @ right.T).double()  # float32 Jacobians: half the memory; the sum is accurate enough


def nystrom_features(kernel: Kernel, points: Tensor, landmarks: Tensor, block_size: int,
                     cutoff: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Nystroem map phi(x) = Lambda^-1/2 V^T k_Z(x) from K_ZZ = V Lambda V^T (eigenvalues below cutoff x the
    largest dropped), so that phi(x) . phi(y) = k_Z(x)^T K_ZZ^+ k_Z(y) approximates k(x, y).

    Returns the features of `points` (N, r') and the projection V Lambda^-1/2 (m, r'), r' <= m landmarks.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram(kernel, landmarks, block_size=block_size))
    kept = eigenvalues > cutoff * eigenvalues[-1].clamp_min(torch.finfo(torch.float64).tiny)
    projection = eigenvectors[:, kept] / eigenvalues[kept].sqrt()
    return gram(kernel, points, landmarks, block_size) @ projection, projection
