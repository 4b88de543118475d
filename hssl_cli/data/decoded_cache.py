"""An image folder's split, decoded once, kept as safetensors (uint8 images, int64 labels, the classes) in the
first writable folder of files.decoded_split_cache_dirs, named by the split, the image size and the digest of
its file list, so a changed folder misses the cache, is decoded again, and its older cache is deleted."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hssl_cli.data.image_files import LISTING_FORMAT
from hssl_cli.files import decoded_split_cache_dirs, save_safetensors_atomically

CACHE_FORMAT = LISTING_FORMAT  # one version string for the listing digest and the cache file, as first written


def cache_name(split: str, size: int, digest: str) -> str:
    """The cache file's name: `<split>-<size>px-<digest prefix>.safetensors`, the split made filename-safe."""
    return f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', split)}-{size}px-{digest[:24]}.safetensors"


def read_decoded(root: Path, name: str, labels: torch.Tensor, classes: list[str], size: int
                 ) -> torch.Tensor | None:
    """The cached images of this split, or None when no cache folder holds a readable one matching the
    labels, classes and size (then it is decoded and written again)."""
    for folder in decoded_split_cache_dirs(root):
        images = _read_one(folder / name, labels, classes, size)
        if images is not None:
            return images
    return None


def _read_one(path: Path, labels: torch.Tensor, classes: list[str], size: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            images, cached_labels = handle.get_tensor("images"), handle.get_tensor("labels")
        cached_classes = json.loads(metadata.get("classes", "null"))
    except (OSError, SafetensorError, KeyError, ValueError):
        return None
    valid = (
        metadata.get("format") == CACHE_FORMAT
        and cached_classes == classes
        and images.dtype == torch.uint8
        and tuple(images.shape) == (len(labels), 3, size, size)
        and cached_labels.dtype == torch.int64
        and torch.equal(cached_labels, labels)
    )
    return images.contiguous() if valid else None


def write_decoded(root: Path, name: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    """Cache the decoded split in the first cache folder that takes it, deleting that folder's older caches
    of it; warn (the next load decodes again) when none does."""
    tensors = {"images": images, "labels": labels}
    metadata = {"format": CACHE_FORMAT, "classes": json.dumps(classes), "source": str(root)}
    problems = []
    for folder in decoded_split_cache_dirs(root):
        try:
            save_safetensors_atomically(folder / name, tensors, metadata)
        except (OSError, SafetensorError) as error:
            problems.append(f"{folder}: {error}")
            continue
        _remove_stale_caches(folder, name, str(root))
        return
    warnings.warn(
        f"could not cache the decoded images ({'; '.join(problems)}); the next load decodes again",
        stacklevel=3,
    )


def _remove_stale_caches(folder: Path, current: str, source: str) -> None:
    """Delete this split's and size's older caches of the same folder (its files changed since): a
    CIFAR-10 train cache is ~150 MB. Caches of other folders sharing ~/.cache/hssl are left alone."""
    split_and_size = current.rsplit("-", 1)[0]
    for path in folder.glob(f"{split_and_size}-*.safetensors"):
        if path.name == current:
            continue
        try:
            with safe_open(path, framework="pt") as handle:
                stale = (handle.metadata() or {}).get("source") == source
            if stale:
                path.unlink()
        except (OSError, SafetensorError):
            continue
