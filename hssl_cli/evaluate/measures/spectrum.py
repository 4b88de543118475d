"""Is a representation collapsing? Spectral metrics of plain (N, D) embeddings, a verdict, the
predictor-to-correlation alignment and the training-time diagnostics (collapse-report draws the spectra).

Every metric takes a plain tensor, so a new kind of features (e.g. an equivariant backbone's lifted
output) is one more entry in the dict that `layer_outputs` returns. Maths runs on the CPU in float64:
D is at most a few thousand and the tails of collapsed spectra sit far below float32's resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hssl_cli.evaluate.measures.collapse_verdict import DEFAULT_THRESHOLD, collapse_verdict, verdict_level
from hssl_cli.methods.base import SSLMethod


def _as_float64(embeddings: Tensor) -> Tensor:
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"expected (N, D) embeddings with N >= 2, got {tuple(embeddings.shape)}")
    return embeddings.detach().to("cpu", torch.float64)


def covariance_eigenvalues(embeddings: Tensor) -> Tensor:
    """Eigenvalues of the (centred, N-1) covariance, descending, the min(D, N-1) that can be non-zero."""
    z = _as_float64(embeddings)
    centred = z - z.mean(dim=0)
    # singular values of the centred data: cheaper than eigh of D x D when N < D, and never negative
    eigenvalues = torch.linalg.svdvals(centred).pow(2) / (z.shape[0] - 1)
    return eigenvalues[: min(z.shape[1], z.shape[0] - 1)]


def standardize_columns(embeddings: Tensor) -> Tensor:
    """Each dimension centred and scaled to unit variance (the linear probe's view of the features).
    A dimension whose spread is below 1e-6 of its magnitude is constant up to float32 noise: it stays 0."""
    z = _as_float64(embeddings)
    centred = z - z.mean(dim=0)
    std = centred.std(dim=0)
    varies = std > 1e-6 * z.pow(2).mean(dim=0).sqrt()
    return torch.where(varies, centred / torch.where(varies, std, torch.ones_like(std)), torch.zeros_like(centred))


def effective_rank(eigenvalues: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of the normalised eigenvalues; 0 for no variance."""
    # exp(-sum_k p_k log p_k), p = lambda / sum(lambda); 0 log 0 = 0
    weights = eigenvalues.clamp_min(0)
    total = weights.sum()
    if total <= 0:
        return 0.0
    p = weights / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp(-sum p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, sigma the
    singular values of the uncentred embeddings."""
    singular_values = torch.linalg.svdvals(_as_float64(embeddings))
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(eigenvalues: Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2: D for an isotropic spectrum, 1 for a single direction."""
    squares = eigenvalues.pow(2).sum()
    return float(eigenvalues.sum().pow(2) / squares) if squares > 0 else 0.0


def normalized_std(embeddings: Tensor) -> float:
    """Mean over dimensions of the std of z / |z| (Jing et al. 2022): 1/sqrt(D) for directions spread
    evenly on the sphere, 0 for complete collapse."""
    return float(F.normalize(_as_float64(embeddings), dim=1).std(dim=0).mean())


def normalized_variance(embeddings: Tensor) -> float:
    """Total variance of z / |z| = 1 - |mean of the unit vectors|^2 (population): in [0, 1]."""
    unit = F.normalize(_as_float64(embeddings), dim=1)
    return float(1 - unit.mean(dim=0).pow(2).sum())


def collapsed_dimensions(eigenvalues: Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Eigenvalues below threshold x the largest (all of them when there is no variance at all)."""
    top = eigenvalues.max() if eigenvalues.numel() else eigenvalues.new_zeros(())
    return int((eigenvalues <= threshold * top).sum()) if top > 0 else int(eigenvalues.numel())


def layer_spectrum(embeddings: Tensor, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Every collapse metric of one layer's (N, D) embeddings, the verdict and the eigenvalues.

    Effective rank, participation ratio, collapsed dimensions and the verdict read the eigenvalues of the
    standardised features (the correlation matrix); `effective_rank_raw` is that of the raw covariance,
    which a common-mode direction can dominate (an untrained ReLU network's features) without any loss
    of information for a probe."""
    eigenvalues = covariance_eigenvalues(standardize_columns(embeddings))
    raw_eigenvalues = covariance_eigenvalues(embeddings)
    dim = embeddings.shape[1]
    rank = effective_rank(eigenvalues)
    total_variance = normalized_variance(embeddings)
    return {
        "dim": dim,
        "available_dims": eigenvalues.numel(),
        "effective_rank": rank,
        "effective_rank_raw": effective_rank(raw_eigenvalues),
        "rankme": rankme(embeddings),
        "participation_ratio": participation_ratio(eigenvalues),
        "normalized_std": normalized_std(embeddings),
        "healthy_std": dim**-0.5,
        "normalized_variance": total_variance,
        "collapsed_dims": collapsed_dimensions(eigenvalues, threshold),
        "verdict": collapse_verdict(rank, total_variance, eigenvalues.numel()),
        "eigenvalues": eigenvalues.tolist(),
    }


def predictor_alignment(embeddings: Tensor, predictions: Tensor) -> dict[str, float]:
    """How well the predictor's eigenvectors match those of the embeddings' correlation C = z^T z / N.

    The predictor is read as its best linear map p ~ W z (least squares on centred data; exact for
    DirectPred's W_P; `linear_fit_r2` says how linear an MLP predictor is). With C = sum_j s_j u_j u_j^T,
    alignment = sum_j s_j |cos(W u_j, u_j)| / sum_j s_j: 1 when every u_j is an eigenvector of W.
    """
    z, p = _as_float64(embeddings), _as_float64(predictions)
    if z.shape != p.shape:
        raise ValueError(f"predictor_alignment: embeddings {tuple(z.shape)} and predictions {tuple(p.shape)} differ")
    z_centred, p_centred = z - z.mean(dim=0), p - p.mean(dim=0)
    solution = torch.linalg.lstsq(z_centred, p_centred, driver="gelsd").solution  # p_c ~ z_c X, W = X^T
    residual = (p_centred - z_centred @ solution).pow(2).sum()
    total = p_centred.pow(2).sum()
    strengths, directions = torch.linalg.eigh(z.T @ z / z.shape[0])
    mapped = solution.T @ directions  # column j: W u_j
    cosines = F.cosine_similarity(mapped, directions, dim=0).abs()
    weights = strengths.clamp_min(0)
    alignment = float((weights * cosines).sum() / weights.sum()) if weights.sum() > 0 else 0.0
    return {"alignment": alignment, "linear_fit_r2": float(1 - residual / total) if total > 0 else 0.0}


@torch.no_grad()
def layer_outputs(method: SSLMethod, images: Tensor) -> dict[str, Tensor]:
    """The (N, D) outputs of a normalised batch to measure, by layer name (the method's
    `collapse_layers`: f(x), lifted fibres, its embedding as the loss sees it, q of it). Call in eval mode."""
    return {name: output.float().flatten(1) for name, output in method.collapse_layers(images).items()}


def training_diagnostics(method: SSLMethod, held_images: Tensor) -> dict[str, float]:
    """The engine's `diagnostics` hook: per layer effective rank, RankMe, std of the normalised
    embeddings x sqrt(D) (1 when healthy), collapsed dimensions and the verdict as a level (0 healthy,
    1 dimensional, 2 complete collapse); the predictor alignment where there is a predictor."""
    outputs = layer_outputs(method, held_images)
    metrics: dict[str, float] = {}
    for name, embeddings in outputs.items():
        spectrum = layer_spectrum(embeddings)
        metrics |= {f"{name}/effective_rank": spectrum["effective_rank"], f"{name}/rankme": spectrum["rankme"],
                    f"{name}/std_ratio": spectrum["normalized_std"] / spectrum["healthy_std"],
                    f"{name}/collapsed_dims": float(spectrum["collapsed_dims"]),
                    f"{name}/collapse_level": float(verdict_level(spectrum["verdict"]))}
    if "predictor" in outputs:
        alignment = predictor_alignment(outputs["projector"], outputs["predictor"])
        metrics |= {f"predictor/{key}": value for key, value in alignment.items()}
    return metrics

