"""Frozen-feature extraction, the linear probe and the weighted kNN probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hssl_cli.data.augment import normalize
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.measures.frozen_probes import (
    knn_probe,
    linear_probe,
    stratified_holdout,
    topk_accuracy,
    train_statistics,
)

WEIGHT_DECAYS = (0.0, 1e-4, 1e-2)


def gaussian_blobs(per_class: int, num_classes: int, dim: int, separation: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = separation * torch.eye(num_classes, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(labels.numel(), dim, generator=generator)
    return features, labels


def test_topk_accuracy_matches_hand_counted_hits():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0 ranked 1st
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 4 ranked 5th
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5 ranked 6th
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 4 ranked 2nd
        ]
    )
    accuracy = topk_accuracy(scores, torch.tensor([0, 4, 5, 4]), ks=(1, 2, 5))
    assert accuracy == pytest.approx({"top1": 25.0, "top2": 50.0, "top5": 75.0})


def test_topk_accuracy_top5_is_100_with_fewer_than_five_classes():
    scores = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert topk_accuracy(scores, torch.tensor([0, 2])) == {"top1": 0.0, "top5": 100.0}


def test_standardize_uses_train_statistics_only():
    generator = torch.Generator().manual_seed(0)
    train = 3.0 * torch.randn(200, 4, generator=generator) + 7.0
    mean, std = train_statistics(train)
    train_standard, test_standard = (train - mean) / std, (train + 5.0 - mean) / std
    assert train_standard.mean(0).abs().max() < 1e-5
    assert torch.allclose(train_standard.std(0), torch.ones(4), atol=1e-5)
    # shifting test by 5 shifts its standardised values by 5 / std(train), not back to zero mean
    assert torch.allclose(test_standard - train_standard, 5.0 / train.std(0).expand(200, 4), atol=1e-5)


def test_knn_weighted_vote_beats_plain_majority():
    # query at angle 0; one class-1 neighbour at angle 0 (cos 1), two class-0 neighbours at
    # +-60 degrees (cos 0.5), one class-0 point opposite (cos -1), outside the k=3 nearest.
    angles = torch.tensor([0.0, math.pi / 3, -math.pi / 3, math.pi])
    train = torch.stack([angles.cos(), angles.sin()], dim=1)
    train_labels = torch.tensor([1, 0, 0, 0])
    query = torch.tensor([[2.0, 0.0]])  # norm 2: cosine similarity must ignore the scale
    # weighted, T = 0.1: class 1 gets exp(1 / 0.1) = 22026, class 0 gets 2 exp(0.5 / 0.1) = 297 -> class 1;
    # a plain majority of the same three neighbours would say class 0.
    weighted = knn_probe(train, train_labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=0.1)
    assert weighted["top1"] == 100.0
    # at a very high temperature every weight is ~1 and the vote becomes the majority: class 0
    majority = knn_probe(train, train_labels, query, torch.tensor([1]), num_classes=2, k=3, temperature=1e4)
    assert majority["top1"] == 0.0


def test_knn_clamps_k_to_train_size_and_chunks_consistently():
    features, labels = gaussian_blobs(per_class=5, num_classes=3, dim=6, separation=4.0, seed=1)
    whole = knn_probe(features, labels, features, labels, num_classes=3, k=1000, temperature=0.1)
    chunked = knn_probe(features, labels, features, labels, 3, k=1000, temperature=0.1, chunk_size=4)
    assert whole == chunked
    assert whole["top1"] > 90.0


def test_linear_probe_separates_gaussian_blobs():
    train_features, train_labels = gaussian_blobs(per_class=60, num_classes=4, dim=8, separation=8.0, seed=0)
    test_features, test_labels = gaussian_blobs(per_class=50, num_classes=4, dim=8, separation=8.0, seed=1)
    result = linear_probe(
        train_features, train_labels, test_features, test_labels, 4, weight_decays=WEIGHT_DECAYS, steps=50
    )
    assert result["top1"] >= 99.0
    assert result["top5"] == 100.0
    assert result["weight_decay"] in WEIGHT_DECAYS


def test_linear_probe_on_noise_labels_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    train_features, test_features = (
        torch.randn(400, 16, generator=generator),
        torch.randn(1000, 16, generator=generator),
    )
    train_labels = torch.randint(0, 4, (400,), generator=generator)
    test_labels = torch.randint(0, 4, (1000,), generator=generator)
    result = linear_probe(
        train_features, train_labels, test_features, test_labels, 4, weight_decays=WEIGHT_DECAYS, steps=50
    )
    assert abs(result["top1"] - 25.0) < 7.0  # chance is 25 %, binomial std over 1000 samples ~1.4 %
    assert result["weight_decay"] in WEIGHT_DECAYS


def test_linear_probe_is_deterministic_given_seed():
    features, labels = gaussian_blobs(per_class=40, num_classes=5, dim=10, separation=1.5, seed=2)
    runs = [
        linear_probe(features, labels, features, labels, 5, WEIGHT_DECAYS, seed=3, steps=30) for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_stratified_holdout_takes_the_fraction_of_every_class():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    mask = stratified_holdout(labels, fraction=0.1, seed=0)
    assert torch.bincount(labels[mask], minlength=3).tolist() == [5, 3, 2]
    assert torch.equal(mask, stratified_holdout(labels, fraction=0.1, seed=0))
    assert not torch.equal(mask, stratified_holdout(labels, fraction=0.1, seed=1))


@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32)
    labels = torch.tensor(digits.target)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))
    train, test = order[:1300], order[1300:]
    return features[train], labels[train], features[test], labels[test]


def test_linear_probe_on_digits_pixels_exceeds_90_percent(digits_split):
    result = linear_probe(*digits_split, num_classes=10)
    assert result["top1"] > 90.0


def test_knn_probe_on_digits_pixels_exceeds_90_percent(digits_split):
    result = knn_probe(*digits_split, num_classes=10, k=20)
    assert result["top1"] > 90.0


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
        )
        self.frozen_norm = nn.BatchNorm1d(4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.frozen_norm(self.body(images).flatten(1))


def test_extract_features_matches_eval_forward_and_restores_modes():
    torch.manual_seed(0)
    model = TinyConvNet()
    with torch.no_grad():  # non-trivial running statistics, so train-mode and eval-mode BatchNorm differ
        model.body[1].running_mean.uniform_(-1, 1)
        model.frozen_norm.running_var.uniform_(0.5, 2)
    model.train()
    model.frozen_norm.eval()  # a submodule frozen on purpose must stay frozen
    images = torch.randint(
        0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])

    features = extract_features(model, images, mean, std, batch_size=3)

    assert features.shape == (10, 4) and features.dtype == torch.float32
    assert model.training and model.body.training and model.body[3].training
    assert not model.frozen_norm.training
    model.eval()
    with torch.no_grad():
        expected = model(normalize(images, mean, std))
    assert torch.allclose(features, expected, atol=1e-5)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(normalize(images, mean, std)), expected, atol=1e-3)
