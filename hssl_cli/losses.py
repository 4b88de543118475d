"""Self-supervised losses as plain functions over tensors (notation of DESIGN.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(name: str, first: torch.Tensor, second: torch.Tensor) -> None:
    if first.ndim != 2 or first.shape != second.shape:
        raise ValueError(f"{name}: expected two (batch, dim) tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) over the 2N views; row i's positive is its other view.

    l_i = -log exp(s(z_i, z_j)/tau) / sum_{k != i} exp(s(z_i, z_k)/tau), s = cosine; mean over 2N rows.
    """
    _check_pair("info_nce", z1, z2)
    batch = z1.shape[0]
    embeddings = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = embeddings @ embeddings.T / temperature
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=logits.device), float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(logits.device)
    return F.cross_entropy(logits, positives)


def byol_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL (Grill et al. 2020): 2 - 2 cos(q(z), z'), mean over the batch; pass a detached target."""
    _check_pair("byol_cosine", prediction, target)
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


def vicreg(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    variance_target: float = 1.0,
    eps: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """VICReg (Bardes et al. 2022): lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')].

    s: mean squared error; v: mean_j max(0, gamma - sqrt(Var z_j + eps)), halved per view as in the
    reference code; c: sum of squared off-diagonal covariances / d.
    """
    _check_pair("vicreg", z1, z2)
    batch, dim = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance = z1.new_zeros(())
    covariance = z1.new_zeros(())
    for z in (z1, z2):
        centred = z - z.mean(dim=0)
        std = torch.sqrt(centred.var(dim=0) + eps)
        variance = variance + F.relu(variance_target - std).mean() / 2
        cov = centred.T @ centred / (batch - 1)
        off_diagonal = cov - torch.diag(torch.diagonal(cov))
        covariance = covariance + off_diagonal.pow(2).sum() / dim
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    return {"loss": loss, "loss/invariance": invariance, "loss/variance": variance, "loss/covariance": covariance}
