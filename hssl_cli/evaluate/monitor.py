"""The online monitor (`train.monitor`): is training helping, while it runs? The frozen backbone's
features of a fixed subset of train fit the probes of `hssl probe` (a cosine kNN, optionally the linear
probe), scored on a fixed subset of `split`; the engine calls it between epochs, in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.sources import load_split
from hssl_cli.evaluate.features import extract_features
from hssl_cli.evaluate.measures.frozen_probes import knn_probe, linear_probe
from hssl_cli.evaluate.subsets import fixed_order
from hssl_cli.recipe import Recipe

KNN_K = 20


def online_monitor(recipe: Recipe) -> OnlineMonitor | None:
    """The monitor train.monitor asks for (None when it is off): its images are loaded here, before training."""
    return OnlineMonitor(recipe) if recipe.train.monitor is not None else None


class OnlineMonitor:
    def __init__(self, recipe: Recipe):
        config = recipe.train.monitor
        self.config = config
        train = load_split(recipe.data, recipe.data.train_split)
        order = fixed_order(len(train.labels), recipe.seed)
        fit = order[:config.samples]
        if config.split == recipe.data.train_split:  # held-out train images, disjoint from the fitted ones
            scored, scored_images, scored_labels = order[config.samples:2 * config.samples], train.images, train.labels
        else:
            other = load_split(recipe.data, config.split)
            scored = fixed_order(len(other.labels), recipe.seed + 1)
            scored, scored_images, scored_labels = scored[:config.samples], other.images, other.labels
        self.fit_images, self.fit_labels = train.images[fit], train.labels[fit]
        self.scored_images, self.scored_labels = scored_images[scored], scored_labels[scored]
        self.classes = len(train.classes)

    def __call__(self, method: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> dict[str, float]:
        fit = extract_features(method.backbone, self.fit_images, mean, std)
        scored = extract_features(method.backbone, self.scored_images, mean, std)
        metrics = {}
        if self.config.knn:
            knn = knn_probe(fit, self.fit_labels, scored, self.scored_labels, self.classes, k=KNN_K)
            metrics[f"monitor/knn_k{KNN_K}_top1"] = knn["top1"]
        if self.config.linear:
            metrics["monitor/linear_top1"] = linear_probe(fit, self.fit_labels, scored, self.scored_labels,
                                                          self.classes)["top1"]
        return metrics
