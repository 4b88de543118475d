"""`--init-from FILE`: the weights a new run starts from, of one of two kinds.

An hssl checkpoint (a .safetensors file with hssl's metadata) fills the whole method: same architecture as the
recipe builds. A backbone weights file fills the backbone only: a timm or torchvision model's state_dict (e.g.
ImageNet weights) saved as .safetensors without hssl's metadata, or as .pth/.pt, which torch reads with
`weights_only=True` (never running a pickle's code). Its keys must match the backbone's state_dict exactly,
except the library model's classifier, which the backbone declares (capabilities.library_classifier) and
which is left out. The projector, predictor and other heads start as the recipe's seed initialises them, and
an EMA target as a copy of the loaded backbone (SSLMethod.start_from_backbone_weights).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.errors import CheckpointError, CheckpointNote, first_line
from hssl_cli.methods.base import SSLMethod
from hssl_cli.models.capabilities import capabilities_of

HSSL_KIND, BACKBONE_KIND = "hssl checkpoint", "backbone weights"
HSSL_METADATA = ("hssl_version", "format_version", "recipe", "kind")  # any one: hssl wrote it (checkpoint.py)
NESTED_STATE_DICTS = ("state_dict", "model")  # where training scripts (timm's, Lightning's, DeiT's, MAE's) put it
# Prefixes a wrapper puts on every key of a model's state_dict: DistributedDataParallel's and torch.compile's (timm's
# own loader, clean_state_dict, removes the same two)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SHOWN_GROUPS = 6  # per kind of mismatch, in the one-line error


@dataclass(frozen=True)
class InitialWeights:
    """What a run started from, for its metrics log."""

    path: Path
    kind: str  # HSSL_KIND or BACKBONE_KIND
    sha256: str  # of the file's bytes

    def log_row(self) -> dict:
        return {"step": 0, "init_from": str(self.path), "init_from_kind": self.kind,
                "init_from_sha256": self.sha256}


def load_initial_weights(method: SSLMethod, init_from: Path, backbone_spec: str) -> InitialWeights:
    """Fill `method` (freshly built from the recipe's seed) from `init_from`; the optimiser, the schedule and
    the step start afresh. `backbone_spec` is the recipe's model.backbone, for the messages."""
    if not init_from.is_file() or is_hssl_checkpoint(init_from):  # a run folder means its last.safetensors
        source = ckpt.load_checkpoint(init_from, kind="model")
        ckpt.load_module_state(method, {k: v for k, v in source.tensors.items() if not k.startswith("data.")},
                               source.path, "model (--init-from)")
        return InitialWeights(source.path, HSSL_KIND, file_sha256(source.path))
    tensors, where = read_weights_file(init_from)
    fitted, left_out = fit_to_backbone(tensors, method.backbone, init_from, backbone_spec)
    method.start_from_backbone_weights(fitted)
    classifier = f"; its classifier {grouped(left_out)} is left out" if left_out else ""
    loaded = len(tensors) - len(left_out)
    warnings.warn(CheckpointNote(f"--init-from {init_from}: {loaded} backbone tensors{where} loaded into "
                                 f"{backbone_spec}{classifier}; the projector and other heads start fresh"),
                  stacklevel=2)
    return InitialWeights(init_from, BACKBONE_KIND, file_sha256(init_from))


def is_hssl_checkpoint(path: Path) -> bool:
    """Whether `path` is a .safetensors file whose metadata says hssl wrote it (hssl export's files, plain
    state_dicts for other code, do not: they are backbone weights)."""
    if ckpt.foreign_format(path) is not None:
        return False
    try:  # the header alone: a file padded to many GB is refused before anything maps it
        metadata = ckpt.read_header_metadata(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"--init-from {path}: not a readable .safetensors file (truncated or corrupt: "
                              f"{first_line(error)[:200]}), nor a torch .pth/.pt file; give another hssl checkpoint "
                              "or backbone weights file") from None
    return any(key in metadata for key in HSSL_METADATA)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A backbone weights file's tensors, and where in the file they were (for the note)."""
    foreign = ckpt.foreign_format(path)
    if foreign is None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path), ""
        except (SafetensorError, ValueError, OSError, RuntimeError) as error:  # e.g. a shape its bytes do not fit
            raise CheckpointError(f"--init-from {path}: not a readable .safetensors file ({first_line(error)}); "
                                  "give an intact copy of the weights") from None
    if foreign.startswith("a text file"):
        raise CheckpointError(f"--init-from {path}: {foreign}; --init-from takes an hssl checkpoint or a backbone's "
                              "weights (.safetensors, .pth, .pt)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = str(error).partition("WeightsUnpickler error: ")[2].split(". ")[0][:160] or first_line(error)
        raise CheckpointError(f"--init-from {path}: torch refuses to read it with weights_only=True, which hssl "
                              f"insists on ({found}): it holds pickled Python objects besides tensors; save the "
                              "state_dict alone: torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"--init-from {path}: torch cannot read it ({first_line(error)[:200]}); the file is "
                              "truncated or corrupt") from None
    return unwrapped_state_dict(loaded, path)


def unwrapped_state_dict(loaded: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in what torch.load returned: the dict itself, or the one under "state_dict" / "model" of a
    training script's checkpoint; without a DDP or torch.compile wrapper's prefix."""
    where = []
    if isinstance(loaded, dict) and not is_state_dict(loaded):
        entry = next((key for key in NESTED_STATE_DICTS if is_state_dict(loaded.get(key))), None)
        if entry is None:
            keys = ", ".join(sorted(str(key) for key in loaded)[:8])
            raise CheckpointError(f"--init-from {path}: no state_dict in it (its top-level entries: {keys}); save "
                                  "the backbone's weights alone: torch.save(model.state_dict(), path)")
        loaded, where = loaded[entry], [f"under '{entry}'"]
    if not is_state_dict(loaded):
        raise CheckpointError(f"--init-from {path}: holds a {type(loaded).__name__}, not a state_dict of tensors; "
                              "save the backbone's weights: torch.save(model.state_dict(), path)")
    for prefix in WRAPPER_PREFIXES * 2:  # wrapped in either order
        if all(key.startswith(prefix) for key in loaded):
            loaded = {key[len(prefix):]: value for key, value in loaded.items()}
            where.append(f"'{prefix}' removed")
    return dict(loaded), f" ({', '.join(where)})" if where else ""


def is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and len(value) > 0 and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())


def fit_to_backbone(tensors: dict[str, torch.Tensor], backbone: nn.Module, path: Path, backbone_spec: str
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's tensors as the backbone's full state_dict, and the classifier keys left out. Any other key the
    file lacks or adds, or any shape that differs, is refused, grouped by first dotted name."""
    expected = backbone.state_dict()
    classifier = capabilities_of(backbone).library_classifier
    # in the network's order (the file's for its extra keys), so that groups read as its layers do
    left_out = [key for key in tensors if key not in expected and key.startswith(tuple(f"{c}." for c in classifier))]
    unexpected = [key for key in tensors if key not in expected and key not in left_out]
    # torchvision's published ImageNet weights predate BatchNorm's num_batches_tracked: it stays at the backbone's
    missing = [key for key in expected if key not in tensors and not key.endswith(".num_batches_tracked")]
    mismatched = [key for key in expected if key in tensors and expected[key].shape != tensors[key].shape]
    if missing or unexpected or mismatched:
        problems = [f"{kind}: {grouped(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                    if keys]
        if mismatched:
            problems.append(f"shape: {shapes(mismatched, tensors, expected)}")
        fix = channels_fix(mismatched, tensors, expected) or mismatch_fix(path, backbone_spec, mismatched)
        raise CheckpointError(f"--init-from {path}: its tensors do not fit model.backbone {backbone_spec} "
                              f"({'; '.join(problems)}); {fix}")
    return {key: tensors.get(key, expected[key]) for key in expected}, left_out


def groups_of(keys: list[str]) -> dict[str, list[str]]:
    """Keys by their first dotted name (layer4.0.conv1.weight -> layer4), in order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    return groups


def grouped(keys: list[str]) -> str:
    """'layer4 (10 tensors), fc (2 tensors)', at most SHOWN_GROUPS groups."""
    groups = groups_of(keys)
    shown = [f"{name} ({len(members)} tensor{'s' if len(members) > 1 else ''})"
             for name, members in list(groups.items())[:SHOWN_GROUPS]]
    more = len(groups) - SHOWN_GROUPS
    return ", ".join(shown) + (f" and {more} more groups" if more > 0 else "")


def shapes(keys: list[str], tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """'conv1.weight [64,3,7,7] in the file vs [64,3,3,3] in the backbone', one per group (its first key)."""
    def shape(tensor: torch.Tensor) -> str:
        return "[" + ",".join(str(size) for size in tensor.shape) + "]"

    shown = []
    for members in list(groups_of(keys).values())[:SHOWN_GROUPS]:
        first = members[0]
        also = f" (and {len(members) - 1} more in {first.split('.', 1)[0]})" if len(members) > 1 else ""
        shown.append(f"{first} {shape(tensors[first])} in the file vs {shape(expected[first])} in the backbone{also}")
    more = len(groups_of(keys)) - SHOWN_GROUPS
    return ", ".join(shown) + (f" and {more} more groups" if more > 0 else "")


def channels_fix(mismatched: list[str], tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                 ) -> str | None:
    """When only the first convolution's input channels differ: the data's channels are not the file's."""
    first_conv = next((key for key, value in expected.items() if value.ndim == 4), None)
    if mismatched != [first_conv]:
        return None
    in_file, in_backbone = tensors[first_conv].shape, expected[first_conv].shape
    if in_file[:1] + in_file[2:] != in_backbone[:1] + in_backbone[2:]:
        return None
    return (f"the file's first layer reads {in_file[1]}-channel images and this data has {in_backbone[1]} "
            f"channels: train on {in_file[1]}-channel data, or give weights for {in_backbone[1]} channels")


def mismatch_fix(path: Path, backbone_spec: str, mismatched: list[str]) -> str:
    """What to do: the file's own architecture where its metadata names it (hssl export writes it)."""
    if backbone_spec == "resnet18_cifar" and "conv1.weight" in mismatched:
        return ("resnet18_cifar has the CIFAR stem (a 3x3 conv1, no max-pool) and the file another (ImageNet's 7x7): "
                "for ImageNet ResNet-18 weights set model.backbone: timm:resnet18 or torchvision:resnet18")
    architecture = None
    if ckpt.foreign_format(path) is None:
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            architecture = (handle.metadata() or {}).get("architecture")
    if architecture is not None and architecture != backbone_spec:
        return (f"the file is for {architecture[:80]} (its metadata); the recipe builds {backbone_spec}: set "
                f"model.backbone: {architecture[:80]}, or give {backbone_spec}'s weights")
    return (f"give the weights of {backbone_spec} (the model the recipe builds), or set model.backbone to the "
            "file's architecture")
