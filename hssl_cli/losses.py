"""Self-supervised losses as plain functions over tensors (notation of DESIGN.md)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hssl_cli.collectives import first_row, gather_with_grad

HALF_DTYPES = (torch.float16, torch.bfloat16)


def full_precision(loss: Callable) -> Callable:
    """Run `loss` outside autocast on float32 copies of its floating tensor arguments: under bf16 autocast
    (the GPU path) a cosine or a variance would otherwise carry 8 bits of mantissa. A no-op in fp32."""

    def upcast(value):  # half precision to float32; float32 and float64 stay as they are
        return value.float() if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES else value

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
    offset = first_row(batch) if gather_distributed else 0  # where this rank's rows sit among the candidates
    return _nt_xent(queries @ candidates.T, batch, all1.shape[0], offset, temperature)


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
                       soft_temperature: float | None = None, gather_distributed: bool = False) -> torch.Tensor:
    """InfoNCE on lifted features (B, |G|, C) with a group-invariant similarity (SSL for G-equivariant
    networks): sim(a, b) = max_g cos(a, rho(g) b), or soft_temperature * logsumexp_g(cos / soft_temperature).

    fibre_permutations (|G|, |G|): row g maps fibre h to the index of g^-1 h, so (rho(g) b)_h = b[row_g[h]].
    For the trivial group it is NT-Xent on the flattened features; transforming one view by any rho(h)
    leaves it unchanged, since {rho(g) rho(h)} = {rho(g)}. With gather_distributed, each rank's rows see
    every rank's views as negatives.
    """
    if u.ndim != 3 or u.shape != v.shape or fibre_permutations.shape != (u.shape[1], u.shape[1]):
        raise ValueError(f"invariant_info_nce: expected two (batch, |G|, C) tensors and a (|G|, |G|) permutation "
                         f"table, got {tuple(u.shape)}, {tuple(v.shape)}, {tuple(fibre_permutations.shape)}")
    batch, group_size, _ = u.shape

    def unit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # each lifted feature scaled to norm 1
        return F.normalize(torch.cat([a, b]).flatten(1), dim=1).view(2 * len(a), group_size, -1)

    all_u, all_v = (gather_with_grad(z) for z in (u, v)) if gather_distributed else (u, v)
    fibre_products = torch.einsum("iac,jbc->ijab", unit(u, v), unit(all_u, all_v))  # <x_i[a], x_j[b]>
    fibres = torch.arange(group_size, device=u.device)
    # cos(x_i, rho(g) x_j) = sum_h <x_i[h], x_j[row_g[h]]>, for every g: (2B, 2T, |G|)
    per_element = fibre_products[:, :, fibres[None, :], fibre_permutations.to(u.device)].sum(-1)
    if soft_temperature is None:
        similarity = per_element.max(dim=-1).values
    else:
        similarity = soft_temperature * torch.logsumexp(per_element / soft_temperature, dim=-1)
    offset = first_row(batch) if gather_distributed else 0
    return _nt_xent(similarity, batch, len(all_u), offset, temperature)


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


@full_precision
def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, redundancy_weight: float = 5e-3, eps: float = 1e-5,
                 gather_distributed: bool = False) -> dict[str, torch.Tensor]:
    """Barlow Twins (Zbontar et al. 2021): L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, with
    C = Z1^T Z2 / N the cross-correlation of the embeddings standardised per dimension over the batch
    (biased variance + eps, as BatchNorm1d without affine). With gather_distributed, over the global batch."""
    _check_pair("barlow_twins", z1, z2)
    if gather_distributed:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)

    def standardised(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)

    correlation = standardised(z1).T @ standardised(z2) / len(z1)
    diagonal = torch.diagonal(correlation)
    invariance = (1 - diagonal).pow(2).sum()
    redundancy = correlation.pow(2).sum() - diagonal.pow(2).sum()
    return {"loss": invariance + redundancy_weight * redundancy, "loss/invariance": invariance,
            "loss/redundancy": redundancy}


@full_precision
def momentum_contrast(queries: torch.Tensor, keys: torch.Tensor, temperature: float,
                      gather_distributed: bool = False) -> torch.Tensor:
    """MoCo v3 (Chen, Xie & He 2021): 2 tau CE(q_i . k_j / tau, j = i) over unit vectors, the other images'
    keys (every rank's, with gather_distributed) as negatives; pass keys from the momentum encoder, detached."""
    _check_pair("momentum_contrast", queries, keys)
    all_keys = gather_with_grad(keys.detach()) if gather_distributed else keys.detach()
    logits = F.normalize(queries, dim=1) @ F.normalize(all_keys, dim=1).T / temperature
    offset = first_row(len(queries)) if gather_distributed else 0
    labels = torch.arange(len(queries), device=queries.device) + offset
    return 2 * temperature * F.cross_entropy(logits, labels)


@full_precision
def dino_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, centre: torch.Tensor,
                       student_temperature: float, teacher_temperature: float | torch.Tensor) -> torch.Tensor:
    """DINO (Caron et al. 2021): the mean over pairs (teacher view i, student view v != i) of the cross-entropy
    H(P_t, P_s) = -sum_k P_t log P_s, averaged over the batch; P_t = softmax((g_t(x) - c) / tau_t) (centred,
    sharpened, detached), P_s = softmax(g_s(x) / tau_s).

    student_logits (V, B, K) holds every view, its first G the views the teacher saw; teacher_logits (G, B, K);
    centre c (K,). Each rank's loss is the mean over its own rows (the centre is what spans the ranks)."""
    if (student_logits.ndim != 3 or teacher_logits.ndim != 3 or student_logits.shape[1:] != teacher_logits.shape[1:]
            or not 1 <= len(teacher_logits) <= len(student_logits) or len(student_logits) < 2
            or centre.shape != student_logits.shape[-1:]):
        raise ValueError(f"dino_cross_entropy: expected student (V, B, K), teacher (G, B, K) with 1 <= G <= V, "
                         f"V >= 2, and centre (K,), got {tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}"
                         f" and {tuple(centre.shape)}")
    teacher_probabilities = F.softmax((teacher_logits.detach() - centre) / teacher_temperature, dim=-1)
    student_log_probabilities = F.log_softmax(student_logits / student_temperature, dim=-1)
    # cross[i, v] = mean_b H(P_t(view i), P_s(view v)): one contraction over (b, k)
    cross = -torch.einsum("ibk,vbk->iv", teacher_probabilities, student_log_probabilities) / student_logits.shape[1]
    teachers, students = cross.shape
    other_view = torch.arange(teachers, device=cross.device)[:, None] != torch.arange(students, device=cross.device)
    return (cross * other_view).sum() / (teachers * students - teachers)  # each teacher view skips its own
