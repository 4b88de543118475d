"""`hssl probe`: frozen features of a checkpoint on a dataset's train/test splits, linear + kNN."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hssl_cli.errors import HsslError
from hssl_cli.recipe import DataConfig

if TYPE_CHECKING:
    import torch

    from hssl_cli.data.sources import ImageSplit
    from hssl_cli.evaluate.linear_sgd import SgdProtocol

KNN_NEIGHBOURS = (20, 200)
PROTOCOLS = ("fast", "standard")


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


def label_fraction(text: str) -> float:
    """'1%' -> 0.01; the fraction of train labels a low-label probe keeps."""
    try:
        percent = float(text.strip().removesuffix("%"))
    except ValueError:
        percent = math.nan
    if not text.strip().endswith("%") or not 0 < percent <= 100:
        raise HsslError(f"--labels {text}: give a percentage of the train labels in (0, 100], e.g. 1%, 10% or 100%")
    return percent / 100


def label_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices keeping `fraction` of each class's images (at least one per class), chosen by a seeded
    permutation: the same subset for every checkpoint probed, so low-label results compare."""
    import torch

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    kept = []
    for label in labels.unique().tolist():
        members = order[labels[order] == label]
        kept.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(kept).sort().values


def check_options(train_samples: int | None, test_samples: int | None, protocol: str, labels: str) -> float:
    """The probe's own options (the standard protocol's are SgdProtocol's, --augmentation's
    augmentation_probe's); returns the fraction of train labels kept."""
    for name, value in (("--train-samples", train_samples), ("--test-samples", test_samples)):
        if value is not None and value < 10:
            raise HsslError(f"{name} {value}: too few images to probe; use at least 10 (or leave it out for all)")
    if protocol not in PROTOCOLS:
        raise HsslError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    return label_fraction(labels)


def probe_checkpoint(path: Path, dataset: str | None = None, data_root: str | None = None,
                     features: str = "backbone", device_name: str = "auto", progress: bool = True,
                     train_samples: int | None = None, test_samples: int | None = None,
                     test_rotations: Sequence[float] = (), validation: bool = False, verify: bool = True,
                     labels: str = "100%", protocol: str = "fast", sgd: SgdProtocol | None = None,
                     cache: bool = True, cache_dir: Path | None = None, exact_kernel_knn: bool = False) -> dict:
    """Linear probe and kNN of a checkpoint's frozen features; `train_samples`/`test_samples` use fixed
    random subsets of the splits; each angle of `test_rotations` (degrees) scores the same probes again
    on the test images rotated by it. `validation`: score on held-out train images instead of the test
    split (test_samples of them, default 10%), disjoint from the probe's train images: the split to
    choose settings on. `labels`: the percentage of train labels kept (per class, seeded). `protocol`:
    fast (L-BFGS on standardised features of the unaugmented images) or standard (`sgd`: the papers' SGD
    with crop and flip). Features are cached (`cache_dir`, default ~/.cache/hssl/features) unless `cache`
    is False. `exact_kernel_knn` (kernel-regime checkpoints): also a kNN whose similarity is the base kernel
    itself, evaluated exactly on the normalised pixels (knn_kK_exact_kernel)."""
    import torch

    from hssl_cli.data.groups import rotate_uint8
    from hssl_cli.engine.checkpoint import load_checkpoint, tensor_checksum
    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.feature_cache import FeatureCache
    from hssl_cli.evaluate.features import extract_features
    from hssl_cli.evaluate.frozen import feature_model, load_trained_method
    from hssl_cli.evaluate.linear_sgd import SgdProtocol, train_linear_sgd
    from hssl_cli.evaluate.probe import fit_linear_probe, knn_probe, topk_accuracy
    from hssl_cli.evaluate.probe_data import LazyImages, probe_split
    from hssl_cli.files import default_cache_dir
    from hssl_cli.render import progress_bar, progress_bars

    fraction = check_options(train_samples, test_samples, protocol, labels)
    started = time.perf_counter()
    device = resolve_device(device_name)
    checkpoint = load_checkpoint(path, verify=verify)
    data_config = evaluation_data(checkpoint.recipe.data, dataset, data_root)
    trained = load_trained_method(checkpoint, device)
    model = feature_model(trained.method, features)
    train = probe_split(data_config, data_config.train_split, device, progress_bars(progress))
    test = None if validation else probe_split(data_config, data_config.test_split, device, progress_bars(progress))
    streamed = isinstance(train.images, LazyImages)
    if streamed and (protocol == "standard" or test_rotations or exact_kernel_knn):
        raise HsslError("--protocol standard, --test-rotation and --exact-kernel-knn read the decoded images; this "
                        "split is streamed (data.storage): probe with --train-subset/--test-subset and data.storage "
                        "memory")
    if train.images.shape[1] != trained.in_channels:
        raise HsslError(f"{data_config.dataset} has {train.images.shape[1]} channel(s) but the checkpoint's model "
                        f"reads {trained.in_channels}; probe on a dataset with {trained.in_channels}")
    train_images, train_labels, test_images, test_labels = probe_images(train, test, train_samples, test_samples)
    if fraction < 1:
        kept = label_subset(train_labels, fraction)
        train_images, train_labels = train_images[kept], train_labels[kept]
    weights = tensor_checksum(checkpoint.tensors) + checkpoint.metadata.get("recipe", "")
    cache_folder = (cache_dir or default_cache_dir()) if cache else None
    feature_cache = FeatureCache(cache_folder, hashlib.sha256(weights.encode()).hexdigest(),
                                 {"features": features, "device": device.type})

    timings = {"features": 0.0, "linear": 0.0, "knn": 0.0}  # seconds, for the report

    def features_of(images: torch.Tensor, what: str) -> torch.Tensor:
        def extract(images: torch.Tensor) -> torch.Tensor:
            with progress_bar(progress, f"features of {what}", len(images)) as advance:
                return extract_features(model, images, trained.mean, trained.std, advance=advance)

        began = time.perf_counter()
        features = feature_cache.features(images, extract).to(device)
        timings["features"] += time.perf_counter() - began
        return features

    train_features = features_of(train_images, "train")
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = len(train.classes)

    began = time.perf_counter()
    if protocol == "fast":
        classifier = fit_linear_probe(train_features, train_labels, num_classes)
        linear_scores, linear_detail = classifier.scores, f"L-BFGS, weight decay {classifier.weight_decay:g}"
    else:
        sgd = sgd or SgdProtocol()
        with progress_bar(progress, "linear SGD (epochs)", sgd.epochs) as advance:
            layer = train_linear_sgd(model, train_images, train_labels, num_classes, trained.mean, trained.std, sgd,
                                     advance)
        linear_scores, linear_detail = layer, sgd.describe()
    timings["linear"] += time.perf_counter() - began
    results = {}

    def score(suffix: str, images: torch.Tensor, neighbours: tuple[int, ...], what: str) -> None:
        test_features = features_of(images, what)
        linear = topk_accuracy(linear_scores(test_features), test_labels)
        results[f"linear{suffix}"] = {**linear, "protocol": protocol, "detail": linear_detail}
        began = time.perf_counter()
        for k in neighbours:
            knn = knn_probe(train_features, train_labels, test_features, test_labels, num_classes, k=k)
            results[f"knn_k{k}{suffix}"] = {**knn, "protocol": "knn", "detail": "cosine, T=0.07"}
        timings["knn"] += time.perf_counter() - began

    score("", test_images, KNN_NEIGHBOURS, "test")
    if exact_kernel_knn:
        results |= exact_kernel_knn_results(trained, train_images, train_labels, test_images, test_labels,
                                            num_classes)
    for degrees in test_rotations:
        angles = torch.full((len(test_images),), math.radians(degrees))
        score(f"@rot{degrees:g}", rotate_uint8(test_images, angles), KNN_NEIGHBOURS[:1], f"test @{degrees:g} deg")
    return {
        "checkpoint": str(checkpoint.path),
        "method": checkpoint.recipe.method.name,
        "backbone": checkpoint.recipe.model.backbone,
        "epoch": checkpoint.epoch,
        "dataset": data_config.dataset,
        "features": features,
        "feature_dim": int(train_features.shape[1]),
        "train_size": len(train_labels),
        "labels": labels.strip(),
        "protocol": protocol,
        "test_size": len(test_labels),
        "test_split": f"{data_config.train_split} (held out)" if validation else data_config.test_split,
        "test_rotations": list(test_rotations),
        "results": results,
        "feature_cache": {"folder": str(cache_folder) if cache_folder else None, "hits": feature_cache.hits,
                          "misses": feature_cache.misses},
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_by_stage": {stage: round(value, 2) for stage, value in timings.items()},
    }


def exact_kernel_knn_results(trained, train_images: torch.Tensor, train_labels: torch.Tensor,
                             test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> dict:
    """kNN under the exact base kernel of a kernel-regime checkpoint: similarity k(x, x') on normalised pixels
    (random Fourier features: the RBF kernel they approximate, same bandwidth), k = 20 and 200, T = 0.07."""
    from hssl_cli.data.augment import normalize
    from hssl_cli.evaluate.probe import knn_votes
    from hssl_cli.models.kernels import exact_kernel, gram

    kernel = getattr(trained.method.backbone, "kernel", None)
    if kernel is None:
        raise HsslError(f"the exact-kernel kNN needs a kernel-regime checkpoint (method kernel), not "
                        f"{type(trained.method).__name__}")
    try:
        kernel = exact_kernel(kernel)
    except ValueError as error:
        raise HsslError(f"the exact-kernel kNN: {error}") from None
    device = trained.mean.device
    train_pixels = normalize(train_images.to(device), trained.mean, trained.std)
    test_pixels = normalize(test_images.to(device), trained.mean, trained.std)
    votes = knn_votes(lambda start, stop: gram(kernel, test_pixels[start:stop], train_pixels), len(test_pixels),
                      train_labels.to(device), test_labels, num_classes, KNN_NEIGHBOURS)
    return {f"knn_k{k}_exact_kernel": {**knn, "protocol": "knn", "detail": "exact base kernel, T=0.07"}
            for k, knn in votes.items()}
