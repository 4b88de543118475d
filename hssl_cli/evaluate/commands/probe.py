"""`hssl probe`: frozen features of a checkpoint on a dataset's train/test splits, linear + kNN."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hssl_cli.errors import HsslError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hssl_cli.evaluate.feature_cache import FeatureCache
    from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
    from hssl_cli.evaluate.measures.linear_sgd import SgdProtocol
    from hssl_cli.evaluate.opening import EvaluationInputs, TrainedMethod

KNN_NEIGHBOURS = (20, 200)
PROTOCOLS = ("fast", "standard", "finetune")
FINETUNE_NOTE = "fine-tuned end to end: not comparable with the frozen protocols (fast, standard, kNN)"


def label_fraction(text: str) -> float:
    """'1%' -> 0.01; the fraction of train labels a low-label probe keeps."""
    try:
        percent = float(text.strip().removesuffix("%"))
    except ValueError:
        percent = math.nan
    if not text.strip().endswith("%") or not 0 < percent <= 100:
        raise HsslError(f"--labels {text}: give a percentage of the train labels in (0, 100], e.g. 1%, 10% or 100%")
    return percent / 100


def check_options(train_samples: int | None, test_samples: int | None, protocol: str, labels: str) -> float:
    """The probe's own options (the standard protocol's are SgdProtocol's, fine-tuning's FinetuneProtocol's,
    --augmentation's augmentation_probe's); returns the fraction of train labels kept."""
    for name, value in (("--train-samples", train_samples), ("--test-samples", test_samples)):
        if value is not None and value < 10:
            raise HsslError(f"{name} {value}: too few images to probe; use at least 10 (or leave it out for all)")
    if protocol not in PROTOCOLS:
        raise HsslError(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    return label_fraction(labels)


def training_protocols(protocol: str, epochs: int | None = None, lr: float | None = None,
                       batch_size: int | None = None, weight_decay: float | None = None,
                       backbone_lr_scale: float | None = None, optimizer: str | None = None
                       ) -> tuple[SgdProtocol | None, FinetuneProtocol | None]:
    """(the standard protocol's SGD, fine-tuning's settings) from the options given (None: the protocol's
    default); settings that the chosen protocol does not read are refused, not ignored."""
    from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
    from hssl_cli.evaluate.measures.linear_sgd import SgdProtocol

    shared = {name: value for name, value in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size),
                                              ("weight_decay", weight_decay)) if value is not None}
    tuning = {name: value for name, value in (("backbone_lr_scale", backbone_lr_scale), ("optimizer", optimizer))
              if value is not None}
    if protocol == "finetune":
        return None, FinetuneProtocol(**shared, **tuning)
    given = [f"--{name.replace('_', '-')}" for name in (*tuning, *(shared if protocol == "fast" else ()))]
    if given:
        raise HsslError(f"{', '.join(given)}: --protocol {protocol} does not read this; drop it, or choose --protocol "
                        f"{'standard (SGD linear) or ' if protocol == 'fast' else ''}finetune")
    return (SgdProtocol(**shared) if protocol == "standard" else None), None


@dataclass
class ProbeSplits:
    """The images and labels a probe fits on (train) and scores on (test)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclass
class StageClock:
    """Seconds spent per stage of the probe, for the report."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timing(self, stage: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began


@dataclass
class FrozenFeatures:
    """Features of the frozen model, through the feature cache, with a progress bar per extraction."""

    model: nn.Module
    trained: TrainedMethod
    cache: FeatureCache
    clock: StageClock
    progress: bool

    def of(self, images: torch.Tensor, what: str) -> torch.Tensor:
        from hssl_cli.evaluate.features import extract_features
        from hssl_cli.render import progress_bar

        def extract(images: torch.Tensor) -> torch.Tensor:
            with progress_bar(self.progress, f"features of {what}", len(images)) as advance:
                return extract_features(self.model, images, self.trained.mean, self.trained.std, advance=advance)

        with self.clock.timing("features"):
            return self.cache.features(images, extract).to(self.trained.mean.device)


def probe_checkpoint(path: Path, dataset: str | None = None, data_root: str | None = None,
                     features: str = "backbone", device_name: str = "auto", progress: bool = True,
                     train_samples: int | None = None, test_samples: int | None = None,
                     test_rotations: Sequence[float] = (), validation: bool = False, verify: bool = True,
                     labels: str = "100%", protocol: str = "fast", sgd: SgdProtocol | None = None,
                     cache: bool = True, cache_dir: Path | None = None, exact_kernel_knn: bool = False,
                     finetune: FinetuneProtocol | None = None) -> dict:
    """Linear probe and kNN of a checkpoint's frozen features; `train_samples`/`test_samples` use fixed
    random subsets of the splits; each angle of `test_rotations` (degrees) scores the same probes again
    on the test images rotated by it. `validation`: score on held-out train images instead of the test
    split (test_samples of them, default 10%), disjoint from the probe's train images: the split to
    choose settings on. `labels`: the percentage of train labels kept (per class, seeded). `protocol`:
    fast (L-BFGS on standardised features of the unaugmented images), standard (`sgd`: the papers' SGD
    with crop and flip) or finetune (`finetune`: backbone and linear head trained end to end; no kNN, no
    feature cache). Features are cached (`cache_dir`, default ~/.cache/hssl/features) unless `cache`
    is False. `exact_kernel_knn` (kernel-regime checkpoints): also a kNN whose similarity is the base kernel
    itself, evaluated exactly on the normalised pixels (knn_kK_exact_kernel)."""
    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.opening import open_for_evaluation

    fraction = check_options(train_samples, test_samples, protocol, labels)
    if protocol == "finetune" and (features != "backbone" or exact_kernel_knn):
        raise HsslError("--protocol finetune tunes the backbone and its own linear head: drop --features projector "
                        "and --exact-kernel-knn (frozen-feature evaluations; use --protocol fast for them)")
    started = time.perf_counter()
    opened = open_for_evaluation(path, resolve_device(device_name), dataset, data_root, verify)
    splits = _probe_splits(opened, progress, train_samples, test_samples, validation, fraction,
                           needs_decoded=protocol == "standard" or bool(test_rotations) or exact_kernel_knn)
    clock = StageClock()
    if protocol == "finetune":
        results, feature_dim, cache_report = _finetuned(opened, splits, finetune, test_rotations, progress, clock)
    else:
        results, feature_dim, cache_report = _frozen(opened, splits, features, protocol, sgd, test_rotations,
                                                     exact_kernel_knn, _feature_cache(opened, features, cache,
                                                                                      cache_dir), progress, clock)
    data = opened.data
    return {
        "checkpoint": opened.source,
        "method": opened.recipe.method.name,
        "backbone": opened.recipe.model.backbone,
        "epoch": opened.checkpoint.epoch,
        "dataset": data.dataset,
        "features": features,
        "feature_dim": feature_dim,
        "train_size": len(splits.train_labels),
        "labels": labels.strip(),
        "protocol": protocol,
        **({"note": FINETUNE_NOTE} if protocol == "finetune" else {}),
        "test_size": len(splits.test_labels),
        "test_split": f"{data.train_split} (held out)" if validation else data.test_split,
        "test_rotations": list(test_rotations),
        "results": results,
        "feature_cache": cache_report,
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_by_stage": {stage: round(value, 2) for stage, value in clock.seconds.items()},
    }


def _frozen(opened: EvaluationInputs, splits: ProbeSplits, features: str, protocol: str, sgd: SgdProtocol | None,
            test_rotations: Sequence[float], exact_kernel_knn: bool, cache: FeatureCache, progress: bool,
            clock: StageClock) -> tuple[dict, int, dict]:
    """(results, feature dimension, the cache's use) of the frozen protocols: a linear probe (fast or standard)
    and kNN on the frozen features, the exact-kernel kNN and the rotated test images where asked."""
    from hssl_cli.evaluate.opening import feature_model

    extractor = FrozenFeatures(feature_model(opened.method, features), opened.trained, cache, clock, progress)
    train_features = extractor.of(splits.train_images, "train")
    with clock.timing("linear"):
        linear = _fit_linear(extractor.model, opened.trained, splits, train_features, protocol, sgd, progress)
    test_features = extractor.of(splits.test_images, "test")
    results = _scores("", test_features, train_features, splits, linear, KNN_NEIGHBOURS, clock)
    if exact_kernel_knn:
        from hssl_cli.evaluate.measures.exact_kernel_knn import exact_kernel_knn as exact_knn

        results |= exact_knn(opened.trained, splits.train_images, splits.train_labels, splits.test_images,
                             splits.test_labels, splits.num_classes, KNN_NEIGHBOURS)
    for degrees in test_rotations:
        rotated = extractor.of(_rotated(splits.test_images, degrees), f"test @{degrees:g} deg")
        results |= _scores(f"@rot{degrees:g}", rotated, train_features, splits, linear, KNN_NEIGHBOURS[:1], clock)
    cache_report = {"folder": str(cache.folder) if cache.folder else None, "hits": cache.hits, "misses": cache.misses}
    return results, int(train_features.shape[1]), cache_report


def _finetuned(opened: EvaluationInputs, splits: ProbeSplits, protocol: FinetuneProtocol | None,
               test_rotations: Sequence[float], progress: bool, clock: StageClock) -> tuple[dict, int, dict]:
    """(results, feature dimension, the cache's use: none) of fine-tuning: top-1/top-5 of the tuned classifier on
    the test images (and on each rotation of them)."""
    from hssl_cli.evaluate.features import extract_features
    from hssl_cli.evaluate.measures.finetune import finetune, steps
    from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol
    from hssl_cli.evaluate.measures.frozen_probes import topk_accuracy
    from hssl_cli.render import progress_bar

    protocol = protocol or FinetuneProtocol()
    trained = opened.trained
    with clock.timing("finetune"), progress_bar(progress, "fine-tuning (steps)",
                                                steps(len(splits.train_labels), protocol)) as advance:
        classifier = finetune(trained.method.backbone, splits.train_images, splits.train_labels, splits.num_classes,
                              trained.mean, trained.std, protocol, advance)
    results = {}
    for suffix, images in [("", splits.test_images), *((f"@rot{degrees:g}", _rotated(splits.test_images, degrees))
                                                       for degrees in test_rotations)]:
        with clock.timing("test"):
            logits = extract_features(classifier, images, trained.mean, trained.std)
        results[f"finetune{suffix}"] = {**topk_accuracy(logits, splits.test_labels), "protocol": "finetune",
                                        "detail": protocol.describe(len(splits.train_labels))}
    return results, int(classifier.head.in_features), {"folder": None, "hits": 0, "misses": 0}


@dataclass
class LinearFit:
    """A fitted linear probe: logits of (raw) test features, and how it was fitted."""

    scores: Callable[[torch.Tensor], torch.Tensor]
    protocol: str
    detail: str


def _probe_splits(opened: EvaluationInputs, progress: bool, train_samples: int | None, test_samples: int | None,
                  validation: bool, fraction: float, needs_decoded: bool) -> ProbeSplits:
    """The probe's train and test images (the held-out train images with `validation`), `fraction` of the train
    labels kept; a streamed split is refused where the probe reads decoded images (`needs_decoded`)."""
    from hssl_cli.evaluate.probe_data import LazyImages
    from hssl_cli.evaluate.subsets import label_subset, probe_images
    from hssl_cli.render import progress_bars

    data = opened.data
    train = opened.read_split(data.train_split, progress_bars(progress), streamed=True)
    test = None if validation else opened.read_split(data.test_split, progress_bars(progress), streamed=True)
    if needs_decoded and isinstance(train.images, LazyImages):
        raise HsslError("--protocol standard, --test-rotation and --exact-kernel-knn read the decoded images; this "
                        "split is streamed (data.storage): probe with --train-subset/--test-subset and data.storage "
                        "memory")
    train_images, train_labels, test_images, test_labels = probe_images(train, test, train_samples, test_samples)
    if fraction < 1:
        kept = label_subset(train_labels, fraction)
        train_images, train_labels = train_images[kept], train_labels[kept]
    device = opened.trained.mean.device
    return ProbeSplits(train_images, train_labels.to(device), test_images, test_labels.to(device), len(train.classes))


def _feature_cache(opened: EvaluationInputs, features: str, cache: bool, cache_dir: Path | None) -> FeatureCache:
    """The feature cache of this checkpoint's weights and recipe (a folder of None: no caching)."""
    from hssl_cli.engine.checkpoint import tensor_checksum
    from hssl_cli.evaluate.feature_cache import FeatureCache
    from hssl_cli.files import default_cache_dir

    checkpoint = opened.checkpoint
    weights = tensor_checksum(checkpoint.tensors) + checkpoint.metadata.get("recipe", "")
    folder = (cache_dir or default_cache_dir()) if cache else None
    return FeatureCache(folder, hashlib.sha256(weights.encode()).hexdigest(),
                        {"features": features, "device": opened.trained.mean.device.type})


def _fit_linear(model: nn.Module, trained: TrainedMethod, splits: ProbeSplits, train_features: torch.Tensor,
                protocol: str, sgd: SgdProtocol | None, progress: bool) -> LinearFit:
    """fast: L-BFGS on the standardised train features; standard: a linear layer on the frozen model, SGD with
    crop and flip (`sgd`)."""
    from hssl_cli.evaluate.measures.frozen_probes import fit_linear_probe
    from hssl_cli.evaluate.measures.linear_sgd import SgdProtocol, train_linear_sgd
    from hssl_cli.render import progress_bar

    if protocol == "fast":
        if splits.train_labels.bincount().max() < 2:  # fit_linear_probe holds out one image of a class
            raise HsslError(f"{len(splits.train_labels)} train images, none of a class with two or more: the linear "
                            "probe chooses its weight decay on held-out images; keep more with --labels or "
                            "--train-samples (probe.train_samples in a suite)")
        classifier = fit_linear_probe(train_features, splits.train_labels, splits.num_classes)
        return LinearFit(classifier.scores, protocol, f"L-BFGS, weight decay {classifier.weight_decay:g}")
    sgd = sgd or SgdProtocol()
    with progress_bar(progress, "linear SGD (epochs)", sgd.epochs) as advance:
        layer = train_linear_sgd(model, splits.train_images, splits.train_labels, splits.num_classes, trained.mean,
                                 trained.std, sgd, advance)
    return LinearFit(layer, protocol, sgd.describe(len(splits.train_labels)))


def _scores(suffix: str, test_features: torch.Tensor, train_features: torch.Tensor, splits: ProbeSplits,
            linear: LinearFit, neighbours: tuple[int, ...], clock: StageClock) -> dict:
    """{linear<suffix>, knn_k<K><suffix>: top-1/top-5 and the protocol} on the test features."""
    from hssl_cli.evaluate.measures.frozen_probes import knn_probe, topk_accuracy

    accuracy = topk_accuracy(linear.scores(test_features), splits.test_labels)
    results = {f"linear{suffix}": {**accuracy, "protocol": linear.protocol, "detail": linear.detail}}
    with clock.timing("knn"):
        for k in neighbours:
            knn = knn_probe(train_features, splits.train_labels, test_features, splits.test_labels, splits.num_classes,
                            k=k)
            results[f"knn_k{k}{suffix}"] = {**knn, "protocol": "knn", "detail": "cosine, T=0.07"}
    return results


def _rotated(images: torch.Tensor, degrees: float) -> torch.Tensor:
    import torch

    from hssl_cli.data.groups import rotate_uint8

    return rotate_uint8(images, torch.full((len(images),), math.radians(degrees)))
