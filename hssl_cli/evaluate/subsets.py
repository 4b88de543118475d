"""Which images an evaluation reads: fixed, seeded subsets, the same for every checkpoint evaluated, so
that two checkpoints' numbers compare on the same images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hssl_cli.errors import HsslError

if TYPE_CHECKING:
    from hssl_cli.data.sources import ImageSplit


def fixed_order(count: int, seed: int = 0) -> torch.Tensor:
    """A permutation of range(count) drawn by a CPU generator seeded with `seed`: the same wherever it is asked."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def fixed_sample(count: int, size: int) -> torch.Tensor:
    """Indices of `size` of `count` items (all of them, in a fixed order, when size >= count)."""
    return fixed_order(count)[:size]


def fixed_subset(count: int, size: int | None) -> torch.Tensor | None:
    """Indices of a fixed random subset of `size` of `count` items, or None for all of them."""
    if size is None or size >= count:
        return None
    return fixed_sample(count, size)


def label_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices keeping `fraction` of each class's images (at least one per class), chosen by a seeded
    permutation: the same subset for every checkpoint probed, so low-label results compare."""
    order = fixed_order(len(labels), seed)
    kept = []
    for label in labels.unique().tolist():
        members = order[labels[order] == label]
        kept.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(kept).sort().values


def probe_images(train: ImageSplit, test: ImageSplit | None, train_samples: int | None, test_samples: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, test images, labels) of the probe. Fixed random subsets when sizes are given;
    with no test split (validation), test_samples (default 10%) held-out train images, disjoint from the
    probe's train images. Unlabelled images (stl10's) never train a probe."""
    labeled = (train.labels >= 0).nonzero().squeeze(1)
    if test is None:
        held = test_samples or max(len(labeled) // 10, 1)
        if held >= len(labeled):
            raise HsslError(f"--test-samples {held}: the train split has only {len(labeled)} labelled images")
        shuffled = labeled[fixed_order(len(labeled))]
        test_images, test_labels = train.images[shuffled[:held]], train.labels[shuffled[:held]]
        labeled = shuffled[held:]
    else:
        test_index = fixed_subset(len(test.labels), test_samples)
        test_images = test.images if test_index is None else test.images[test_index]
        test_labels = test.labels if test_index is None else test.labels[test_index]
    chosen = fixed_subset(len(labeled), train_samples)
    train_index = labeled if chosen is None else labeled[chosen]
    return train.images[train_index], train.labels[train_index], test_images, test_labels
