"""`hssl probe`: frozen features of a checkpoint on a dataset's train/test splits, linear + kNN."""

from __future__ import annotations

import time
from pathlib import Path

from hssl_cli.errors import HsslError
from hssl_cli.recipe import DataConfig

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


def probe_checkpoint(path: Path, dataset: str | None = None, data_root: str | None = None,
                     features: str = "backbone", device_name: str = "auto", progress: bool = True) -> dict:
    from hssl_cli.data.sources import load_split
    from hssl_cli.engine.checkpoint import load_checkpoint
    from hssl_cli.engine.train import resolve_device
    from hssl_cli.evaluate.features import extract_features
    from hssl_cli.evaluate.frozen import load_frozen
    from hssl_cli.evaluate.probe import knn_probe, linear_probe

    started = time.perf_counter()
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(path)
    data_config = evaluation_data(checkpoint.recipe.data, dataset, data_root)
    frozen = load_frozen(checkpoint, device, features)
    train = load_split(data_config, data_config.train_split, progress=progress)
    test = load_split(data_config, data_config.test_split, progress=progress)
    if train.images.shape[1] != frozen.in_channels:
        raise HsslError(f"{data_config.dataset} has {train.images.shape[1]} channel(s) but the checkpoint's model "
                        f"reads {frozen.in_channels}; probe on a dataset with {frozen.in_channels}")
    train_features = extract_features(frozen.model, train.images, frozen.mean, frozen.std)
    test_features = extract_features(frozen.model, test.images, frozen.mean, frozen.std)
    train_labels, test_labels = train.labels.to(device), test.labels.to(device)
    num_classes = len(train.classes)

    results = {}
    linear = linear_probe(train_features, train_labels, test_features, test_labels, num_classes)
    results["linear"] = {"top1": linear["top1"], "top5": linear["top5"],
                         "detail": f"weight decay {linear['weight_decay']:g}"}
    for k in KNN_NEIGHBOURS:
        knn = knn_probe(train_features, train_labels, test_features, test_labels, num_classes, k=k)
        results[f"knn_k{k}"] = {"top1": knn["top1"], "top5": knn["top5"], "detail": "cosine, T=0.07"}
    return {
        "checkpoint": str(checkpoint.path),
        "method": checkpoint.recipe.method.name,
        "backbone": checkpoint.recipe.model.backbone,
        "epoch": checkpoint.epoch,
        "dataset": data_config.dataset,
        "features": features,
        "feature_dim": int(train_features.shape[1]),
        "train_size": len(train.labels),
        "test_size": len(test.labels),
        "results": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
