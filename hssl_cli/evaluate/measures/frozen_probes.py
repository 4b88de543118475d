"""Probes on frozen features: a full-batch linear classifier and a weighted kNN, both on the features' device.

Everything is batched torch (no per-sample Python loops, no scikit-learn) and deterministic on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percentage of rows whose label is among the k highest scores, as {"top1": ..., "top5": ...}.

    k is clamped to the number of classes, so top-5 with fewer than five classes is 100.
    """
    if scores.ndim != 2 or labels.shape != scores.shape[:1] or labels.numel() == 0:
        raise ValueError(
            f"non-empty scores (N, C) and labels (N,) expected, "
            f"got {tuple(scores.shape)}, {tuple(labels.shape)}"
        )
    num_classes = scores.shape[1]
    ranked = scores.topk(min(max(ks), num_classes), dim=1).indices
    hits = ranked == labels.to(ranked.device).view(-1, 1)  # (N, k): True where the label sits at that rank
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).sum().item() / labels.numel() for k in ks}


def train_statistics(train: Tensor) -> tuple[Tensor, Tensor]:
    """The per-dimension mean and std (1, D) of the train features that standardise train and test features alike
    (the linear probe's (x - mean) / std); a constant
    dimension's std is clamped to 1e-6, so it stays constant (zero) instead of dividing by zero."""
    return train.mean(dim=0, keepdim=True), train.std(dim=0, keepdim=True).clamp_min(1e-6)


def _check_split(features: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"{name}: features (N, D) and labels (N,) expected, "
            f"got {tuple(features.shape)}, {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def stratified_holdout(labels: Tensor, fraction: float, seed: int, at_least: int = 0) -> Tensor:
    """Boolean mask holding out max(round(fraction * count), at_least) samples of each class, at least one sample
    kept.

    Deterministic given `seed`: a seeded permutation, then a stable sort by class, then the first
    samples of each class in that order are held out.
    """
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(labels.numel(), generator=generator).to(labels.device)
    order = permutation[labels[permutation].argsort(stable=True)]  # grouped by class, shuffled within
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    class_starts = counts.cumsum(0) - counts
    # rank of each sample inside its class; the first `held` ranks go to the hold-out part
    rank = torch.arange(labels.numel(), device=labels.device) - class_starts[sorted_labels]
    held = torch.minimum((counts * fraction).round().long().clamp_min(at_least), (counts - 1).clamp_min(0))
    mask = torch.zeros(labels.numel(), dtype=torch.bool, device=labels.device)
    mask[order] = rank < held[sorted_labels]
    return mask


def _fit_softmax_regression(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float, steps: int
) -> tuple[Tensor, Tensor]:
    """Weights (D, C) and bias (C) minimising mean cross-entropy + weight_decay / 2 * ||W||^2.

    L-BFGS with a strong-Wolfe line search rather than Adam: the objective is smooth and convex, so a
    quasi-Newton method reaches a tight optimum in ~100 full-batch iterations with no learning rate to
    tune, and the result does not depend on a schedule (Adam would need one per weight decay).
    """
    weight = torch.zeros(features.shape[1], num_classes, device=features.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=steps,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        # L = mean_i CE(x_i W + b, y_i) + (lambda / 2) ||W||_F^2 ; the bias is not decayed
        loss = F.cross_entropy(features @ weight + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


WEIGHT_DECAYS = (0, 1e-5, 1e-4, 1e-3, 1e-2)  # the linear probe's candidates, chosen on held-out train images


@dataclass
class LinearClassifier:
    """A fitted linear probe: standardisation (train statistics) then softmax regression."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    weight_decay: float

    def scores(self, features: Tensor) -> Tensor:
        """Logits (N, C) of raw (unstandardised) features."""
        features = features.detach().float().to(self.weight.device)
        return (features - self.mean) / self.std @ self.weight + self.bias


def _fit(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float, steps: int) -> LinearClassifier:
    mean, std = train_statistics(features)
    weight, bias = _fit_softmax_regression((features - mean) / std, labels, num_classes, weight_decay, steps)
    return LinearClassifier(mean, std, weight, bias, weight_decay)


def fit_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    steps: int = 100,
) -> LinearClassifier:
    """Softmax regression on standardised frozen features. The weight decay is chosen by top-1 on a
    stratified held-out part of train (ties go to the larger value), then the classifier is refit on the
    whole train split with it. `steps` caps the L-BFGS iterations per fit. Where `holdout_fraction` of every
    class rounds to none (classes of a few images), one image of each class that has two or more is held out;
    a ValueError where no class has two."""
    _check_split(train_features, train_labels, num_classes, "train")
    if not weight_decays:
        raise ValueError("weight_decays must name at least one candidate")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    train_features = train_features.detach().float()
    train_labels = train_labels.to(train_features.device).long()

    chosen = float(weight_decays[0])
    if len(weight_decays) > 1:
        held_out = stratified_holdout(train_labels, holdout_fraction, seed)
        if not held_out.any():
            held_out = stratified_holdout(train_labels, holdout_fraction, seed, at_least=1)
        if not held_out.any():
            raise ValueError(
                f"no class of the {train_labels.numel()} train samples has two to hold one out; "
                "pass a single weight decay"
            )
        fit, held = ~held_out, held_out
        best = None
        for weight_decay in weight_decays:
            classifier = _fit(train_features[fit], train_labels[fit], num_classes, weight_decay, steps)
            top1 = topk_accuracy(classifier.scores(train_features[held]), train_labels[held], ks=(1,))["top1"]
            if best is None or (top1, weight_decay) > best:
                best = (top1, weight_decay)
        chosen = float(best[1])
    return _fit(train_features, train_labels, num_classes, chosen, steps)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    steps: int = 100,
) -> dict[str, float]:
    """fit_linear_probe on train, scored on test: {"top1", "top5", "weight_decay"}."""
    _check_split(test_features, test_labels, num_classes, "test")
    classifier = fit_linear_probe(train_features, train_labels, num_classes, weight_decays, holdout_fraction, seed,
                                  steps)
    return {**topk_accuracy(classifier.scores(test_features), test_labels), "weight_decay": classifier.weight_decay}


def knn_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Weighted kNN on cosine similarity (InstDisc / DINO); returns {"top1", "top5"} in percent.

    Each of the k nearest train samples votes for its class with weight exp(sim / temperature); k is
    clamped to the train size. Test rows are processed `chunk_size` at a time so that the similarity
    matrix never exceeds chunk_size x N_train.
    """
    _check_split(train_features, train_labels, num_classes, "train")
    _check_split(test_features, test_labels, num_classes, "test")
    device = train_features.device
    train_unit = F.normalize(train_features.detach().float(), dim=1)
    test_unit = F.normalize(test_features.detach().float().to(device), dim=1)
    return knn_votes(lambda start, stop: test_unit[start:stop] @ train_unit.T, len(test_unit),
                     train_labels.to(device), test_labels, num_classes, (k,), temperature, chunk_size)[k]


def knn_votes(similarity: Callable[[int, int], Tensor], test_count: int, train_labels: Tensor, test_labels: Tensor,
              num_classes: int, ks: Sequence[int], temperature: float = 0.07, chunk_size: int = 1024
              ) -> dict[int, dict[str, float]]:
    """The weighted kNN vote for any similarity, for each k of `ks` from one pass: `similarity(start, stop)`
    gives test rows start:stop against every train sample (B, N_train); the k most similar vote with weight
    exp(sim / temperature)."""
    if min(ks) < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"k, temperature and chunk_size must be positive, got {list(ks)}, {temperature}, {chunk_size}"
        )
    device = train_labels.device
    train_labels = train_labels.long()
    largest = min(max(ks), len(train_labels))
    scores: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, test_count, chunk_size):
        rows = similarity(start, min(start + chunk_size, test_count)).to(device)
        top_similarity, top_index = rows.topk(largest, dim=1)  # sorted: the first k are the k nearest
        for k in ks:
            k_similarity, k_index = top_similarity[:, :min(k, largest)], top_index[:, :min(k, largest)]
            # w = exp((s - s_max) / T): the per-row shift leaves the vote unchanged and avoids overflow at small T
            weights = ((k_similarity - k_similarity[:, :1]) / temperature).exp().float()
            votes = torch.zeros(weights.shape[0], num_classes, device=device)
            scores[k].append(votes.scatter_add_(1, train_labels[k_index], weights))
    return {k: topk_accuracy(torch.cat(parts), test_labels.to(device)) for k, parts in scores.items()}
