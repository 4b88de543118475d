"""`hssl probe`: frozen features of a checkpoint on a dataset's train/test splits, linear + kNN."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hssl_cli.errors import HsslError
from hssl_cli.recipe import DataConfig

if TYPE_CHECKING:
    import torch

    from hssl_cli.data.sources import ImageSplit

KNN_NEIGHBOURS = (20, 200)


def evaluation_data(data: DataConfig, dataset: str | None, data_root: str | None) -> DataConfig:
    """The checkpoint's data section, or `--dataset` (its default splits) and `--data-root` instead."""
    from pydantic import ValidationError

    fields = data.model_dump()
    if dataset is not None and dataset != fields["dataset"]:
        fields.update(dataset=dataset, root=None, train_split="train", test_split="test")
    if data_root is not None:
        fields["root"] = data_root
    try:
        data_config = DataConfig.model_validate(fields)
    except ValidationError as error:
        raise HsslError(f"--dataset {dataset}: {error.errors()[0]['msg']}") from None
    if data_config.dataset != "digits" and data_config.root is None:
        raise HsslError(f"--dataset {data_config.dataset} needs --data-root (the folder with its files)")
    return data_config


def fixed_subset(count: int, size: int | None) -> torch.Tensor | None:
    """Indices of a fixed random subset of `size` of `count` items (seed 0: the same for every checkpoint
    probed), or None for all of them."""
    import torch

    if size is None or size >= count:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(0))[:size]


def probe_images(train: ImageSplit, test: ImageSplit | None, train_samples: int | None, test_samples: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, test images, labels) of the probe. Fixed random subsets when sizes are given;
    with no test split (validation), test_samples (default 10%) held-out train images, disjoint from the
    probe's train images. Unlabelled images (stl10's) never train a probe."""
    import torch

    labeled = (train.labels >= 0).nonzero().squeeze(1)
    if test is None:
        held = test_samples or max(len(labeled) // 10, 1)
        if held >= len(labeled):
            raise HsslError(f"--test-samples {held}: the train split has only {len(labeled)} labelled images")
        shuffled = labeled[torch.randperm(len(labeled), generator=torch.Generator().manual_seed(0))]
        test_images, test_labels = train.images[shuffled[:held]], train.labels[shuffled[:held]]
        labeled = shuffled[held:]
    else:
        test_index = fixed_subset(len(test.labels), test_samples)
        test_images = test.images if test_index is None else test.images[test_index]
        test_labels = test.labels if test_index is None else test.labels[test_index]
    chosen = fixed_subset(len(labeled), train_samples)
    train_index = labeled if chosen is None else labeled[chosen]
    return train.images[train_index], train.labels[train_index], test_images, test_labels


def probe_checkpoint(path: Path, dataset: str | None = None, data_root: str | None = None,
                     features: str = "backbone", device_name: str = "auto", progress: bool = True,
                     train_samples: int | None = None, test_samples: int | None = None,
                     test_rotations: Sequence[float] = (), validation: bool = False, verify: bool = True) -> dict:
    """Linear probe and kNN of a checkpoint's frozen features; `train_samples`/`test_samples` use fixed
    random subsets of the splits; each angle of `test_rotations` (degrees) scores the same probes again
    on the test images rotated by it. `validation`: score on held-out train images instead of the test
    split (test_samples of them, default 10%), disjoint from the probe's train images: the split to
    choose settings on."""
    import math

    import torch

    from hssl_cli.data.groups import rotate_uint8
    from hssl_cli.data.sources import load_split
    from hssl_cli.engine.checkpoint import load_checkpoint
    from hssl_cli.engine.train import resolve_device
    from hssl_cli.evaluate.features import extract_features
    from hssl_cli.evaluate.frozen import feature_model, load_trained_method
    from hssl_cli.evaluate.probe import fit_linear_probe, knn_probe, topk_accuracy

    for name, value in (("--train-samples", train_samples), ("--test-samples", test_samples)):
        if value is not None and value < 10:
            raise HsslError(f"{name} {value}: too few images to probe; use at least 10 (or leave it out for all)")
    started = time.perf_counter()
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(path, verify=verify)
    data_config = evaluation_data(checkpoint.recipe.data, dataset, data_root)
    trained = load_trained_method(checkpoint, device)
    model = feature_model(trained.method, features)
    train = load_split(data_config, data_config.train_split, progress=progress)
    test = None if validation else load_split(data_config, data_config.test_split, progress=progress)
    if train.images.shape[1] != trained.in_channels:
        raise HsslError(f"{data_config.dataset} has {train.images.shape[1]} channel(s) but the checkpoint's model "
                        f"reads {trained.in_channels}; probe on a dataset with {trained.in_channels}")
    train_images, train_labels, test_images, test_labels = probe_images(train, test, train_samples, test_samples)
    train_features = extract_features(model, train_images, trained.mean, trained.std)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = len(train.classes)

    classifier = fit_linear_probe(train_features, train_labels, num_classes)
    results = {}

    def score(suffix: str, images: torch.Tensor, neighbours: tuple[int, ...]) -> None:
        test_features = extract_features(model, images, trained.mean, trained.std)
        linear = topk_accuracy(classifier.scores(test_features), test_labels)
        results[f"linear{suffix}"] = {**linear, "detail": f"weight decay {classifier.weight_decay:g}"}
        for k in neighbours:
            knn = knn_probe(train_features, train_labels, test_features, test_labels, num_classes, k=k)
            results[f"knn_k{k}{suffix}"] = {**knn, "detail": "cosine, T=0.07"}

    score("", test_images, KNN_NEIGHBOURS)
    for degrees in test_rotations:
        angles = torch.full((len(test_images),), math.radians(degrees))
        score(f"@rot{degrees:g}", rotate_uint8(test_images, angles), KNN_NEIGHBOURS[:1])
    return {
        "checkpoint": str(checkpoint.path),
        "method": checkpoint.recipe.method.name,
        "backbone": checkpoint.recipe.model.backbone,
        "epoch": checkpoint.epoch,
        "dataset": data_config.dataset,
        "features": features,
        "feature_dim": int(train_features.shape[1]),
        "train_size": len(train_labels),
        "test_size": len(test_labels),
        "test_split": f"{data_config.train_split} (held out)" if validation else data_config.test_split,
        "test_rotations": list(test_rotations),
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
