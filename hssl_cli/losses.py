"""Self-supervised losses as plain functions over tensors (notation of DESIGN.md)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def full_precision(loss: Callable) -> Callable:
    """Run `loss` outside autocast on float32 copies of its floating tensor arguments: under bf16 autocast
    (the GPU path) a cosine or a variance would otherwise carry 8 bits of mantissa. A no-op in fp32."""

    def upcast(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    @functools.wraps(loss)
    def in_float32(*args, **kwargs):
        device_type = next(a.device.type for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
        with torch.autocast(device_type, enabled=False):
            return loss(*map(upcast, args), **{name: upcast(value) for name, value in kwargs.items()})

    return in_float32


def _check_pair(name: str, first: torch.Tensor, second: torch.Tensor) -> None:
    if first.ndim != 2 or first.shape != second.shape:
        raise ValueError(f"{name}: expected two (batch, dim) tensors of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all ranks; the backward SUMS the gradients that every rank sends back
    (torch.distributed.nn's all_gather), so the gathered loss's gradient is the same for 1 or N ranks.
    The identity when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of _functional_collectives, whose backward (reduce_scatter) gloo lacks.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor), dim=0)


@full_precision
def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_distributed: bool = False
             ) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) over the 2N views; row i's positive is its other view.

    l_i = -log exp(s(z_i, z_j)/tau) / sum_{k != i} exp(s(z_i, z_k)/tau), s = cosine; mean over 2N rows.
    With gather_distributed, each rank's rows see every rank's views as negatives.
    """
    _check_pair("info_nce", z1, z2)
    batch = z1.shape[0]
    queries = F.normalize(torch.cat([z1, z2]), dim=1)
    all1, all2 = (gather_with_grad(z) for z in (z1, z2)) if gather_distributed else (z1, z2)
    candidates = F.normalize(torch.cat([all1, all2]), dim=1)
    total = all1.shape[0]
    offset = batch * (dist.get_rank() if total > batch else 0)  # where this rank's rows sit among candidates
    return _nt_xent(queries @ candidates.T, batch, total, offset, temperature)


def _nt_xent(similarity: torch.Tensor, batch: int, total: int, offset: int, temperature: float) -> torch.Tensor:
    """Cross-entropy of NT-Xent from the (2 batch, 2 total) similarities of local views to all views."""
    local = torch.arange(batch, device=similarity.device) + offset
    own = torch.cat([local, local + total])  # each query's own column
    positive = torch.cat([local + total, local])  # the other view of the same image
    logits = similarity / temperature
    logits[torch.arange(2 * batch, device=similarity.device), own] = float("-inf")
    return F.cross_entropy(logits, positive)


@full_precision
def invariant_info_nce(u: torch.Tensor, v: torch.Tensor, fibre_permutations: torch.Tensor, temperature: float,
                       soft_temperature: float | None = None) -> torch.Tensor:
    """InfoNCE on lifted features (B, |G|, C) with a group-invariant similarity (SSL for G-equivariant
    networks): sim(a, b) = max_g cos(a, rho(g) b), or soft_temperature * logsumexp_g(cos / soft_temperature).

    fibre_permutations (|G|, |G|): row g maps fibre h to the index of g^-1 h, so (rho(g) b)_h = b[row_g[h]].
    For the trivial group it is NT-Xent on the flattened features; transforming one view by any rho(h)
    leaves it unchanged, since {rho(g) rho(h)} = {rho(g)}.
    """
    if u.ndim != 3 or u.shape != v.shape or fibre_permutations.shape != (u.shape[1], u.shape[1]):
        raise ValueError(f"invariant_info_nce: expected two (batch, |G|, C) tensors and a (|G|, |G|) permutation "
                         f"table, got {tuple(u.shape)}, {tuple(v.shape)}, {tuple(fibre_permutations.shape)}")
    batch, group_size, _ = u.shape
    views = F.normalize(torch.cat([u, v]).flatten(1), dim=1).view(2 * batch, group_size, -1)
    fibre_products = torch.einsum("iac,jbc->ijab", views, views)  # <x_i[a], x_j[b]>
    fibres = torch.arange(group_size, device=u.device)
    # cos(x_i, rho(g) x_j) = sum_h <x_i[h], x_j[row_g[h]]>, for every g: (2B, 2B, |G|)
    per_element = fibre_products[:, :, fibres[None, :], fibre_permutations.to(u.device)].sum(-1)
    if soft_temperature is None:
        similarity = per_element.max(dim=-1).values
    else:
        similarity = soft_temperature * torch.logsumexp(per_element / soft_temperature, dim=-1)
    return _nt_xent(similarity, batch, batch, 0, temperature)


@full_precision
def byol_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL (Grill et al. 2020): 2 - 2 cos(q(z), z'), mean over the batch; pass a detached target."""
    _check_pair("byol_cosine", prediction, target)
    return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


@full_precision
def iso_loss(z: torch.Tensor, target: torch.Tensor, predictor_weight: torch.Tensor) -> torch.Tensor:
    """IsoLoss (Halvagal, Laborieux, Zenke 2023): a loss on z whose gradient is BYOL's gradient w.r.t.
    the prediction p = W_P z, so no eigenvalue of W_P scales the learning rate of its direction.

    sim_i = z_i.z'_i / sg(|p_i||z'_i|) - 1/2 sg(p_i.z'_i / (|p_i|^3 |z'_i|)) z_i^T W_P z_i; L = -2 mean(sim).
    `predictor_weight` W_P must be symmetric (then z^T W_P z = |W_P^{1/2} z|^2); `target` z' is detached here.
    """
    _check_pair("iso_loss", z, target)
    if predictor_weight.shape != (z.shape[1], z.shape[1]):
        raise ValueError(f"iso_loss: predictor_weight must be ({z.shape[1]}, {z.shape[1]}), "
                         f"got {tuple(predictor_weight.shape)}")
    target = target.detach()
    projected = z @ predictor_weight  # rows W_P z_i (W_P symmetric); the gradient flows through the quadratic
    with torch.no_grad():
        prediction_norm = projected.norm(dim=1).clamp_min(1e-8)
        target_norm = target.norm(dim=1).clamp_min(1e-8)
        alignment = (projected * target).sum(1) / (prediction_norm**3 * target_norm)
    similarity = (z * target).sum(1) / (prediction_norm * target_norm) - 0.5 * alignment * (z * projected).sum(1)
    return -2 * similarity.mean()


@full_precision
def vicreg(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    variance_target: float = 1.0,
    eps: float = 1e-4,
    gather_distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """VICReg (Bardes et al. 2022): lambda s(Z, Z') + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')].

    s: mean squared error; v: mean_j max(0, gamma - sqrt(Var z_j + eps)), halved per view as in the
    reference code; c: sum of squared off-diagonal covariances / d. With gather_distributed every
    term is computed on the global batch (as in the reference code).
    """
    _check_pair("vicreg", z1, z2)
    if gather_distributed:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
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
