"""The opening every evaluation command shares: a checkpoint (or, for equivariance-check, a recipe's freshly
initialised model) -> the method frozen on a device with its preprocessing, and the data to evaluate it on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from hssl_cli.engine.checkpoint import Checkpoint, load_module_state
from hssl_cli.errors import CheckpointError, HsslError
from hssl_cli.methods.base import SSLMethod
from hssl_cli.progress import Progress, no_progress
from hssl_cli.recipe import DataConfig, Recipe

if TYPE_CHECKING:
    from hssl_cli.data.sources import ImageSplit


@dataclass
class TrainedMethod:
    method: SSLMethod         # eval mode, on its device, gradients off
    mean: torch.Tensor        # per-channel statistics of the pretraining data (preprocessing)
    std: torch.Tensor

    @property
    def in_channels(self) -> int:
        return self.mean.numel()


@dataclass
class EvaluationInputs:
    """What `open_for_evaluation` returns: the frozen method and the data it is evaluated on."""

    trained: TrainedMethod
    data: DataConfig               # the recipe's data section, with --dataset / --data-root applied
    recipe: Recipe                 # the checkpoint's stored recipe, or the recipe file
    source: str                    # the checkpoint's or the recipe's path
    checkpoint: Checkpoint | None  # None: a freshly initialised model built from a recipe

    @property
    def method(self) -> SSLMethod:
        return self.trained.method

    def read_split(self, split: str, progress: Progress = no_progress, streamed: bool = False) -> ImageSplit:
        """One split of the evaluation data, refused when its channels are not the model's. `streamed`: where
        data.storage streams the split, its images are LazyImages (probe_data.probe_split)."""
        from hssl_cli.data.sources import load_split
        from hssl_cli.evaluate.probe_data import probe_split

        device = self.trained.mean.device
        images = probe_split(self.data, split, device, progress) if streamed else load_split(self.data, split,
                                                                                                progress)
        channels, expected = images.images.shape[1], self.trained.in_channels
        if channels != expected:
            raise HsslError(f"{self.data.dataset} has {channels} channel(s) but the model reads {expected}; "
                            f"use a dataset with {expected}")
        return images


class Embedding(nn.Module):
    """The method's embedding of one view (`SSLMethod.embedding`) as a module, for feature extraction."""

    def __init__(self, method: SSLMethod):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.embedding(images)


def evaluation_data(data: DataConfig, dataset: str | None, data_root: str | None) -> DataConfig:
    """The recipe's data section, or `--dataset` (its default splits) and `--data-root` instead."""
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


def open_for_evaluation(source: Path, device: torch.device, dataset: str | None = None, data_root: str | None = None,
                        verify: bool = True, from_recipe: bool = False) -> EvaluationInputs:
    """`source`: a checkpoint, whose trained method is rebuilt from the file alone; with `from_recipe`, a recipe
    file, whose method is built freshly initialised (seeded by its seed), its preprocessing statistics measured on
    its test split. The method is frozen on `device`; `dataset`/`data_root` replace the recipe's data."""
    if from_recipe:
        return _open_recipe(source, device, dataset, data_root)
    from hssl_cli.engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(source, verify=verify)
    data = evaluation_data(checkpoint.recipe.data, dataset, data_root)
    return EvaluationInputs(load_trained_method(checkpoint, device), data, checkpoint.recipe, str(checkpoint.path),
                            checkpoint)


def _open_recipe(path: Path, device: torch.device, dataset: str | None, data_root: str | None) -> EvaluationInputs:
    from hssl_cli.data.sources import load_split
    from hssl_cli.data.statistics import channel_stats
    from hssl_cli.methods import build_method
    from hssl_cli.recipe import load_recipe

    # --data-root completes the recipe before it is checked (a recipe may name no root of its own)
    recipe = load_recipe(path, [f"data.root={data_root}"] if data_root is not None else [])
    data = evaluation_data(recipe.data, dataset, None)
    mean, std = channel_stats(load_split(data, data.test_split).images)
    torch.manual_seed(recipe.seed)
    method = build_method(recipe, in_channels=mean.numel())
    trained = TrainedMethod(method.to(device).eval().requires_grad_(False), mean.float().to(device),
                            std.float().to(device))
    return EvaluationInputs(trained, data, recipe, str(path), checkpoint=None)


def load_trained_method(checkpoint: Checkpoint, device: torch.device) -> TrainedMethod:
    """The checkpoint's method with its weights and preprocessing, frozen on `device`."""
    from hssl_cli.methods import build_method

    if "data.mean" not in checkpoint.tensors:
        raise CheckpointError(f"{checkpoint.path}: no data.mean/data.std tensors; not written by hssl pretrain")
    mean, std = checkpoint.tensors["data.mean"], checkpoint.tensors["data.std"]
    method = build_method(checkpoint.recipe, in_channels=mean.numel())
    load_module_state(method, {k: v for k, v in checkpoint.tensors.items() if not k.startswith("data.")},
                      checkpoint.path, "model")
    return TrainedMethod(method.to(device).eval().requires_grad_(False), mean.to(device), std.to(device))


def feature_model(method: SSLMethod, features: str) -> nn.Module:
    """`features`: "backbone" for f(x), "projector" for the method's embedding of one view."""
    if features == "backbone":
        return method.backbone
    if features == "projector" and method.has_embedding:
        return Embedding(method)
    raise CheckpointError(f"the {type(method).__name__} model has no {features} output; use --features backbone")
