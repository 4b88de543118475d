"""Checkpoints: .safetensors only (never pickle), atomic writes, validated loads.

A model checkpoint holds the method's tensors under the prefixes of DESIGN.md (backbone., projector.,
predictor., target., ...) and string metadata: hssl_version, format_version, recipe (YAML), method,
backbone, epoch, step, metrics (JSON), torch_version, plus the data statistics needed to rebuild the
preprocessing. A training state (`*.state.safetensors`) holds the model again under `model.` and the
optimiser under `optimizer.`, with the step and the optimiser's hyper-parameters as JSON metadata, so
it alone is enough to resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from hssl_cli.errors import CheckpointError, CheckpointNote
from hssl_cli.files import save_safetensors_atomically
from hssl_cli.recipe import MAX_TEXT_FILE_BYTES, Recipe, RecipeError, parse_recipe, recipe_to_yaml
from hssl_cli.version import __version__

FORMAT_VERSION = 1
REQUIRED_METADATA = ("hssl_version", "format_version", "recipe", "kind", "epoch", "step")
KINDS = ("model", "training_state")
CHECKSUM = "tensor_sha256"  # metadata key: tensor_checksum() of the file's tensors
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
MAX_STEP = 10**12
ANOTHER_CHECKPOINT = "use another checkpoint of the run, e.g. an epoch-NNNN.safetensors"


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
        "hssl_version": __version__,
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
    """Host copies, contiguous. Device tensors are copied into pinned host memory without blocking, all of
    them queued at once, then one synchronisation: not one blocking copy per tensor."""
    copies, queued = {}, False
    for key, value in state.items():
        value = value.detach()
        if value.device.type == "cuda":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            queued = True
        else:
            host = value.contiguous()
        copies[f"{prefix}{key}"] = host
    if queued:
        torch.cuda.synchronize()
    return copies


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (independent of the layout
    safetensors chose in the file)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_safetensors_atomically(path, tensors, metadata | {CHECKSUM: tensor_checksum(tensors)})


def save_model(path: Path, model: nn.Module, recipe: Recipe, epoch: int, step: int,
               metrics: dict[str, float], data_stats: dict[str, torch.Tensor]) -> None:
    """A model checkpoint: the method's state_dict plus `data.mean`/`data.std` for preprocessing."""
    tensors = _cpu_tensors(model.state_dict()) | _cpu_tensors(data_stats, "data.")
    metadata = _base_metadata(recipe, "model", epoch, step) | {"metrics": json.dumps(metrics)}
    _save(path, tensors, metadata)


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
                        epoch: int, step: int, data_stats: dict[str, torch.Tensor]) -> None:
    optimizer_state = optimizer.state_dict()
    tensors = _cpu_tensors(model.state_dict(), "model.") | _cpu_tensors(data_stats, "data.")
    scalars, optimizer_tensors = {}, {}
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                optimizer_tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    tensors |= _cpu_tensors(optimizer_tensors, "optimizer.")
    metadata = _base_metadata(recipe, "training_state", epoch, step) | {
        "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    _save(path, tensors, metadata)


def load_checkpoint(path: str | Path, kind: str = "model", verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint: its metadata (types, ranges, JSON, sizes) before any tensor, then the
    tensors against the checksum in its metadata (`verify`; a file without one loads with a note). Every
    problem is a CheckpointError that says what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / ("last.safetensors" if kind == "model" else "last.state.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    unreadable = f"{path}: not a readable .safetensors file (truncated or corrupt: {{}}); {ANOTHER_CHECKPOINT}"
    foreign = foreign_format(path)
    if foreign is not None:
        raise CheckpointError(f"{path}: not a .safetensors file ({foreign}); hssl reads the .safetensors "
                              "checkpoints that hssl pretrain writes")
    try:
        metadata = read_header_metadata(path)
    except (ValueError, OSError, UnicodeDecodeError) as error:
        raise CheckpointError(unreadable.format(error)) from None
    _check_metadata(path, metadata, kind)
    try:
        recipe = parse_recipe(metadata["recipe"], source=f"{path} (stored recipe)")
    except RecipeError as error:
        raise CheckpointError(f"{path}: its stored recipe does not fit this hssl: {error}") from None
    try:
        tensors = load_file(path)
    except (SafetensorError, ValueError, OSError, RuntimeError) as error:
        raise CheckpointError(unreadable.format(error)) from None
    if CHECKSUM not in metadata:
        warnings.warn(CheckpointNote(f"{path}: no checksum in its metadata (written by an older hssl or another "
                                     "tool); its tensors are loaded unverified"), stacklevel=2)
    elif verify and tensor_checksum(tensors) != metadata[CHECKSUM]:
        raise CheckpointError(f"{path}: its tensors do not match the checksum in its metadata (the file is "
                              "corrupt); use another checkpoint of the run, or --no-verify to load it anyway")
    _check_data_stats(path, tensors)
    return Checkpoint(path, tensors, metadata, recipe)


def foreign_format(path: Path) -> str | None:
    """What a file is when it is plainly not safetensors (whose first bytes are a header length, then '{')."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(64)
    except OSError:
        return None
    if len(start) >= 9 and start[8:9] == b"{":  # first: a header length may well start with byte 0x80
        return None
    if start.startswith(b"PK\x03\x04"):
        return "a zip archive: torch.save's .pt/.pth format?"
    if start[:1] == b"\x80" and start[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return "a Python pickle"
    if start and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in start):
        return "a text file: a recipe? pass it to hssl pretrain"
    return None


def read_header_metadata(path: Path) -> dict[str, str]:
    """The __metadata__ of a .safetensors file, from its header alone: 8-byte little-endian length, then JSON with
    an optional __metadata__ of strings and, per tensor, its data_offsets [begin, end) in the bytes after the
    header. The file must end where the last tensor does: a truncated file, or one padded (a sparse file of many
    GB), is a CheckpointError naming both sizes, before safetensors maps it into memory. A header that is not
    such JSON (nested too deeply included) is a ValueError."""
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        header_length = int.from_bytes(handle.read(8), "little")
        if not 2 <= header_length <= min(MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"a header of {header_length} bytes in a file of {file_size}")
        try:
            header = json.loads(handle.read(header_length))
        except RecursionError:
            raise ValueError("its header is nested too deeply") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not a mapping of strings")
    described = 8 + header_length + _data_end(header)
    if file_size != described:
        raise CheckpointError(f"{path}: not a readable .safetensors file ("
                              f"{'truncated' if file_size < described else 'padded'}: the file has {file_size:,} "
                              f"bytes, its header describes {described:,}); {ANOTHER_CHECKPOINT}")
    return metadata


def _data_end(header: dict) -> int:
    """Where the tensors' bytes end: the largest end of their data_offsets."""
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name[:40]!r} has no valid data_offsets [begin, end]")
        end = max(end, offsets[1])
    return end


def _natural(path: Path, metadata: dict[str, str], key: str, limit: int) -> int:
    value = metadata[key]
    if not (value.isascii() and value.isdigit()) or int(value) > limit:
        raise CheckpointError(f"{path}: metadata {key}={value[:40]!r} is not a whole number in 0..{limit}; the file "
                              "is corrupt or not written by hssl")
    return int(value)


def _check_metadata(path: Path, metadata: dict[str, str], kind: str) -> None:
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: a .safetensors file, but not an hssl checkpoint (no {', '.join(missing)} "
                              "in its metadata); hssl reads checkpoints written by `hssl pretrain`")
    version = _natural(path, metadata, "format_version", 10**6)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by hssl {metadata['hssl_version'][:40]} in checkpoint format {version}; this hssl "
            f"{__version__} reads format {FORMAT_VERSION} and older: upgrade hssl")
    if metadata["kind"] not in KINDS:
        raise CheckpointError(f"{path}: metadata kind={metadata['kind'][:40]!r} is none of {', '.join(KINDS)}")
    if metadata["kind"] != kind:
        wanted = "a model checkpoint (*.safetensors)" if kind == "model" else "a training state (*.state.safetensors)"
        raise CheckpointError(f"{path}: this is a {metadata['kind']} file; expected {wanted}")
    epoch, step = _natural(path, metadata, "epoch", MAX_STEP), _natural(path, metadata, "step", MAX_STEP)
    if epoch > step and step > 0:
        raise CheckpointError(f"{path}: metadata epoch={epoch} exceeds step={step}; the file is corrupt")
    if len(metadata["recipe"]) > MAX_TEXT_FILE_BYTES:
        raise CheckpointError(f"{path}: its stored recipe is {len(metadata['recipe']):,} characters, more than "
                              f"{MAX_TEXT_FILE_BYTES:,}; the file is corrupt or not written by hssl")
    expected_json = {"model": {"metrics": dict},
                     "training_state": {"optimizer_param_groups": list, "optimizer_scalars": dict}}[kind]
    for key, kind_of in expected_json.items():
        if key not in metadata and kind == "model":
            continue  # metrics are informative; a training state cannot resume without its optimiser's
        try:
            parsed = json.loads(metadata.get(key, "null"))
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, kind_of):
            raise CheckpointError(f"{path}: metadata {key} is not a JSON {kind_of.__name__}; the file is corrupt")


def _check_data_stats(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """data.mean/data.std: the preprocessing every command rebuilds; 1 or 3 finite floats, std > 0."""
    stats = [tensors.get(f"data.{name}") for name in ("mean", "std")]
    if all(t is None for t in stats):
        return
    if any(t is None or not t.is_floating_point() or t.ndim != 1 or t.numel() not in (1, 3) or not t.isfinite().all()
           for t in stats) or stats[0].shape != stats[1].shape or (stats[1] <= 0).any():
        raise CheckpointError(f"{path}: its data.mean/data.std tensors are not 1 or 3 finite per-channel statistics "
                              "(std > 0); the file is corrupt or not written by hssl pretrain")


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
    wrong_dtype = sorted(k for k in expected.keys() & tensors.keys() if expected[k].dtype != tensors[k].dtype)
    if missing or unexpected or mismatched or wrong_dtype:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if mismatched:
            key = mismatched[0]
            details.append(f"shape of {key} is {tuple(tensors[key].shape)}, the model has {tuple(expected[key].shape)}")
        if wrong_dtype:
            key = wrong_dtype[0]
            details.append(f"dtype of {key} is {tensors[key].dtype}, the model has {expected[key].dtype}")
        raise CheckpointError(
            f"{source}: the {what} tensors do not fit the model its recipe builds ({'; '.join(details)})")
    module.load_state_dict(tensors)


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    try:
        state: dict[int, dict] = {}
        for key, value in checkpoint.prefixed("optimizer").items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        for key, value in json.loads(checkpoint.metadata["optimizer_scalars"]).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        param_groups = json.loads(checkpoint.metadata["optimizer_param_groups"])
        optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{checkpoint.path}: the optimiser state does not fit ({type(error).__name__}: "
                              f"{str(error)[:200]}); resume from another run or start a new one") from None
