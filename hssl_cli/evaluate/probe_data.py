"""The splits `hssl probe` reads: decoded in memory, or, where data.storage streams them, LazyImages that decode
a batch when it is used (features batch by batch, DataLoader workers reading and decoding ahead)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from hssl_cli.data.sources import ImageSplit, load_split
from hssl_cli.data.stream import EncodedImages, choose_storage, decoding_loader, encoded_source, started_workers
from hssl_cli.progress import Progress, no_progress
from hssl_cli.recipe import DataConfig


class LazyImages:
    """A split's images decoded only when a batch of them is used: indexing gives another LazyImages,
    `batches(n)` decodes them n at a time (DataLoader workers reading and decoding ahead), `to(device)`
    decodes all of them. What `hssl probe` extracts features from when a split is streamed."""

    ndim = 4

    def __init__(self, dataset: EncodedImages, positions: torch.Tensor, workers: int):
        self.dataset, self.positions, self.workers = dataset, positions, workers

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), 3, self.dataset.size, self.dataset.size)

    def __getitem__(self, key) -> LazyImages:
        return LazyImages(self.dataset, self.positions[key], self.workers)

    @property
    def digest(self) -> str:
        """Identifies these images without decoding them: the source, the size, which samples."""
        digest = hashlib.sha256(f"{self.dataset.source.digest}|{self.dataset.size}|".encode())
        digest.update(torch.tensor([self.dataset.indices[i] for i in self.positions.tolist()]).numpy().tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        order = self.positions.tolist()
        loader = decoding_loader(self.dataset, [order[start:start + batch_size]
                                                for start in range(0, len(order), batch_size)], self.workers)
        for batch in started_workers(loader):
            yield torch.from_numpy(batch)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        return torch.cat(list(self.batches(512))).to(device, non_blocking=non_blocking)


def probe_split(config: DataConfig, split: str, device: torch.device, progress: Progress = no_progress
                ) -> ImageSplit:
    """A split for `hssl probe`: decoded in memory (sources.load_split), or, where data.storage says stream
    (or auto finds the decoded split too large for the device), an ImageSplit whose images are LazyImages."""
    if config.storage == "memory" or config.dataset not in ("imagefolder", "shards") or config.random_rotation:
        return load_split(config, split, progress=progress)
    source = encoded_source(config, split, config.on_corrupt)
    storage, _ = choose_storage(config, len(source), device)
    if storage == "memory":
        return load_split(config, split, progress=progress)
    dataset = EncodedImages(source, torch.arange(len(source)), config.image_size, config.on_corrupt)
    return ImageSplit(LazyImages(dataset, torch.arange(len(source)), config.workers), source.labels,
                      source.classes)
