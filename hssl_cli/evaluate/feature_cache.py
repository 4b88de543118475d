"""Frozen features kept between probes: one safetensors file per (weights, images, feature kind, device
kind), named by a SHA-256 of all four, so a second `hssl probe` of a checkpoint skips the extraction and
any change of weights or images misses the cache instead of reading stale features."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hssl_cli.errors import CheckpointNote
from hssl_cli.evaluate.probe_data import LazyImages
from hssl_cli.files import save_safetensors_atomically

FORMAT = "hssl-features/1"


def images_digest(images: torch.Tensor | LazyImages) -> str:
    """SHA-256 of a uint8 image batch's shape and bytes (about 0.3 s for CIFAR-10's 150 MB); streamed images
    (LazyImages) give their own digest (source, size, samples), without decoding."""
    if isinstance(images, LazyImages):
        return images.digest
    digest = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}".encode())
    digest.update(images.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class FeatureCache:
    """`features(images, extract)`: the cached features of `images`, or extract(images), stored.
    `weights` identifies the model (its tensors' checksum and recipe); `context` the rest (feature kind,
    device type: CUDA extracts under bf16, so its features differ from the CPU's)."""

    def __init__(self, folder: Path | None, weights: str, context: dict):
        self.folder, self.weights, self.context = folder, weights, context
        self.hits = self.misses = 0

    def key(self, images: torch.Tensor) -> str:
        parts = {"format": FORMAT, "weights": self.weights, "images": images_digest(images), **self.context}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def features(self, images: torch.Tensor, extract: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.folder is None:
            return extract(images)
        path = self.folder / f"{self.key(images)}.safetensors"
        try:
            cached = load_file(path)["features"]
            if cached.shape[0] == images.shape[0]:
                self.hits += 1
                return cached
        except (OSError, SafetensorError, KeyError):
            pass  # absent, or unreadable (a full disk, another version): extract again
        self.misses += 1
        features = extract(images)
        try:
            save_safetensors_atomically(path, {"features": features.detach().cpu().contiguous()},
                                        {"format": FORMAT})
        except (OSError, SafetensorError) as error:
            warnings.warn(CheckpointNote(f"features not cached in {self.folder} ({error}); --no-cache skips it"),
                          stacklevel=2)
        return features
