"""Checkpoints: .safetensors only (never pickle), atomic writes, validated loads.

A model checkpoint holds the method's tensors under the prefixes of DESIGN.md (backbone., projector.,
predictor., target., ...) and string metadata: hssl_version, format_version, recipe (YAML), method,
backbone, epoch, step, metrics (JSON), torch_version, plus the data statistics needed to rebuild the
preprocessing. A training state (`*.state.safetensors`) holds the model again under `model.` and the
optimiser under `optimizer.`, with the step and the optimiser's hyper-parameters as JSON metadata, so
it alone is enough to resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from torch import nn

import hssl_cli
from hssl_cli.errors import CheckpointError
from hssl_cli.files import save_safetensors_atomically
from hssl_cli.recipe import Recipe, RecipeError, parse_recipe, recipe_to_yaml

FORMAT_VERSION = 1
REQUIRED_METADATA = ("hssl_version", "format_version", "recipe", "kind")


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    recipe: Recipe

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    @property
    def epoch(self) -> int:
        return int(self.metadata["epoch"])

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under `prefix.`, with the prefix removed."""
        start = prefix + "."
        return {key[len(start):]: value for key, value in self.tensors.items() if key.startswith(start)}


def _base_metadata(recipe: Recipe, kind: str, epoch: int, step: int) -> dict[str, str]:
    return {
        "hssl_version": hssl_cli.__version__,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "recipe": recipe_to_yaml(recipe),
        "method": recipe.method.name,
        "backbone": recipe.model.backbone,
        "epoch": str(epoch),
        "step": str(step),
        "torch_version": torch.__version__,
    }


def _cpu_tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value.detach().to("cpu").contiguous() for key, value in state.items()}


def save_model(path: Path, model: nn.Module, recipe: Recipe, epoch: int, step: int,
               metrics: dict[str, float], data_stats: dict[str, torch.Tensor]) -> None:
    """A model checkpoint: the method's state_dict plus `data.mean`/`data.std` for preprocessing."""
    tensors = _cpu_tensors(model.state_dict()) | _cpu_tensors(data_stats, "data.")
    metadata = _base_metadata(recipe, "model", epoch, step) | {"metrics": json.dumps(metrics)}
    save_safetensors_atomically(path, tensors, metadata)


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
                        epoch: int, step: int, data_stats: dict[str, torch.Tensor]) -> None:
    optimizer_state = optimizer.state_dict()
    tensors = _cpu_tensors(model.state_dict(), "model.") | _cpu_tensors(data_stats, "data.")
    scalars = {}
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    metadata = _base_metadata(recipe, "training_state", epoch, step) | {
        "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    save_safetensors_atomically(path, tensors, metadata)


def load_checkpoint(path: str | Path, kind: str = "model") -> Checkpoint:
    """Read and validate a checkpoint; every problem is a CheckpointError that says what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / ("last.safetensors" if kind == "model" else "last.state.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        payload = path.read_bytes()
        tensors = load_bytes(payload)
        metadata = _read_metadata(payload)
    except (SafetensorError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file (truncated or corrupt: {error}); "
            "use another checkpoint of the run, e.g. an epoch-NNNN.safetensors"
        ) from None
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: a .safetensors file, but not an hssl checkpoint (no {', '.join(missing)} "
                              "in its metadata); hssl reads checkpoints written by `hssl pretrain`")
    if int(metadata["format_version"]) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by hssl {metadata['hssl_version']} in checkpoint format "
            f"{metadata['format_version']}; this hssl {hssl_cli.__version__} reads format {FORMAT_VERSION} "
            "and older: upgrade hssl"
        )
    if metadata["kind"] != kind:
        wanted = "a model checkpoint (*.safetensors)" if kind == "model" else "a training state (*.state.safetensors)"
        raise CheckpointError(f"{path}: this is a {metadata['kind']} file; expected {wanted}")
    try:
        recipe = parse_recipe(metadata["recipe"], source=f"{path} (stored recipe)")
    except RecipeError as error:
        raise CheckpointError(f"{path}: its stored recipe does not fit this hssl: {error}") from None
    return Checkpoint(path, tensors, metadata, recipe)


def _read_metadata(payload: bytes) -> dict[str, str]:
    """safetensors' header: 8-byte little-endian length, then JSON with an optional __metadata__."""
    header_length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_length])
    return header.get("__metadata__", {}) or {}


# Entries older versions wrote and this one no longer reads: H-SSL's pair sampler position (pairs are now
# drawn from the step's seeded generator).
RETIRED_KEYS = ("pair_sampler._extra_state",)


def load_module_state(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path, what: str) -> None:
    """Load tensors into a module, naming missing, unexpected and mis-shaped entries on failure."""
    tensors = {key: value for key, value in tensors.items() if not key.endswith(RETIRED_KEYS)}
    expected = module.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            key = mismatched[0]
            details.append(f"shape of {key} is {tuple(tensors[key].shape)}, the model has {tuple(expected[key].shape)}")
        raise CheckpointError(
            f"{source}: the {what} tensors do not fit the model its recipe builds ({'; '.join(details)})")
    module.load_state_dict(tensors)


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    state: dict[int, dict] = {}
    for key, value in checkpoint.prefixed("optimizer").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(checkpoint.metadata["optimizer_scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    param_groups = json.loads(checkpoint.metadata["optimizer_param_groups"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{checkpoint.path}: the optimiser state does not fit: {error}") from None
