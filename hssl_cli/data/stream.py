"""The training split as the engine reads it: decoded and held on the device (`data.storage: memory`), or kept
encoded and decoded batch by batch (`stream`) for splits larger than the device's memory.

Both give the same batches: the per-epoch permutation is a function of (seed, epoch), a rank reads its
share of each step's batch, and a streamed image is decoded and resized by the in-memory loader's code,
so on the CPU a streamed run's weights equal an in-memory run's, and a killed streamed run resumes at the
step (the sample) it stopped at. Streaming reads image files of an image folder or samples of `hssl shards`
shards; DataLoader workers (`data.workers`) read and decode the next batches while the device trains; the
host memory they hold is a few batches, whatever the split's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from hssl_cli.data.image_files import decode_at_size, list_images
from hssl_cli.data.shards import ShardReader
from hssl_cli.data.sources import load_split
from hssl_cli.data.statistics import ChannelStats, channel_stats
from hssl_cli.errors import DataError, HsslError
from hssl_cli.files import default_cache_dir, write_text_atomically
from hssl_cli.progress import Progress, no_progress
from hssl_cli.recipe import DataConfig

MEMORY_FRACTION = 0.25  # data.storage auto: the decoded split may take this much of the device's memory
PREFETCH_BATCHES = 2  # per worker
STATS_FORMAT = "hssl-stream-stats/1"


class InMemoryImages:
    """The decoded split on the device: a batch is one indexing."""

    storage = "memory"

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices.to(self.images.device)]

    def channel_stats(self, progress: Progress = no_progress) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_stats(self.images.cpu())

    def epoch_batches(self, permutation: torch.Tensor, start_step: int, batch_size: int, rank_batch: int,
                      rank: int) -> Iterator[torch.Tensor]:
        for step in range(start_step, len(permutation) // batch_size):
            first = step * batch_size + rank * rank_batch  # this rank's share of the batch
            yield self.images[permutation[first:first + rank_batch]]


class EncodedSource(Protocol):
    """A split kept encoded, read sample by sample: image files (FileSource) or shards (shards.ShardReader)."""

    labels: torch.Tensor  # int64 (N,), -1 where unlabeled
    classes: list[str]
    digest: str  # identifies what is read (the file list with sizes and dates, or the shards' checksums)

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...  # for errors: the file, or the shard and its member

    def read(self, index: int) -> bytes: ...


class EncodedImages(torch.utils.data.Dataset):
    """Sample i of the training split (after data.subset) -> uint8 (3, size, size), read and decoded on call
    (in a DataLoader worker). A sample that cannot be decoded stops the run, naming it, or with on_corrupt
    `skip` is replaced by the next decodable sample, with a warning."""

    def __init__(self, source: EncodedSource, indices: torch.Tensor, size: int, on_corrupt: str,
                 encoded_only: bool = False):
        self.source, self.indices, self.size, self.on_corrupt = source, indices.tolist(), size, on_corrupt
        self.encoded_only = encoded_only  # workers only read bytes; the training process decodes (on CUDA)

    def __len__(self) -> int:
        return len(self.indices)

    def decode(self, item: int) -> torch.Tensor:
        index = self.indices[item]
        return decode_at_size([self.source.name(index)], [self.source.read(index)], self.size)[0]

    def __getitem__(self, item: int) -> torch.Tensor | tuple[str, bytes]:
        if self.encoded_only:
            index = self.indices[item]
            return self.source.name(index), self.source.read(index)
        return self.image(item)

    def image(self, item: int) -> torch.Tensor:
        """Sample `item` decoded, or by data.on_corrupt skip the next decodable one."""
        for attempt in range(len(self)):
            try:
                return self.decode((item + attempt) % len(self))
            except DataError as error:
                if self.on_corrupt == "stop":
                    raise DataError(f"{error} (data.on_corrupt: skip replaces it with the next image)") from None
                warnings.warn(f"{error}: replaced by the next image (data.on_corrupt: skip)", stacklevel=2)
        raise DataError(f"{self.source.name(self.indices[item])}: no image of this split can be decoded")


class StreamedImages:
    """The split kept encoded: `epoch_batches` runs a DataLoader over this rank's share of every remaining
    step of the epoch, in the permutation's order, its workers reading and decoding ahead."""

    storage = "stream"

    def __init__(self, dataset: EncodedImages, device: torch.device, workers: int):
        self.dataset, self.device, self.workers = dataset, device, workers

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.dataset.size, self.dataset.size)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.dataset.image(int(i)) for i in indices.tolist()]).to(self.device)

    def channel_stats(self, progress: Progress = no_progress) -> tuple[torch.Tensor, torch.Tensor]:
        """One streamed pass in the split's order, summed in the in-memory statistics' chunks: the same
        float64 sums, so the same mean and std as `data.storage: memory`. Kept in $HSSL_CACHE_DIR/stats,
        keyed by the source (its file list with sizes and dates, or its shards' checksums), the image size
        and the chosen images: a second run of the same data skips the pass."""
        cached = self._cached_stats()
        if cached is not None:
            return cached
        mean, std = self._streamed_stats(progress)
        self._cache_stats(mean, std)
        return mean, std

    def _stats_path(self) -> Path:
        key = hashlib.sha256(f"{STATS_FORMAT}|{self.dataset.source.digest}|{self.dataset.size}|".encode())
        key.update(torch.tensor(self.dataset.indices, dtype=torch.int64).numpy().tobytes())
        return default_cache_dir("stats") / f"{key.hexdigest()[:32]}.json"

    def _cached_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            stored = json.loads(self._stats_path().read_text())
            return tuple(torch.tensor([float.fromhex(v) for v in stored[name]], dtype=torch.float64)
                         for name in ("mean", "std"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _cache_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        path = self._stats_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps({"format": STATS_FORMAT, "mean": [v.hex() for v in mean.tolist()],
                                                    "std": [v.hex() for v in std.tolist()]}))
        except OSError as error:  # an unwritable cache costs the pass next time, nothing else
            warnings.warn(f"channel statistics not cached in {path.parent} ({error.strerror})", stacklevel=3)

    def _streamed_stats(self, progress: Progress) -> tuple[torch.Tensor, torch.Tensor]:
        stats = ChannelStats(3, self.sample_shape)
        loader = self._loader([list(range(start, min(start + stats.chunk_size, len(self))))
                               for start in range(0, len(self), stats.chunk_size)])
        with progress("channel statistics (one streamed pass)", len(self)) as advance:
            for chunk in started_workers(loader):
                stats.add(torch.from_numpy(chunk))
                advance(len(chunk))
        return stats.result()

    def _loader(self, batches: list[list[int]], encoded: bool = False):
        return decoding_loader(self.dataset, batches, self.workers, encoded)

    def epoch_batches(self, permutation: torch.Tensor, start_step: int, batch_size: int, rank_batch: int,
                      rank: int) -> Iterator[torch.Tensor]:
        order = permutation.cpu()  # once per epoch
        shares = [order[step * batch_size + rank * rank_batch:step * batch_size + (rank + 1) * rank_batch].tolist()
                  for step in range(start_step, len(order) // batch_size)]
        if self.device.type == "cuda":  # workers read bytes; JPEGs are decoded on the GPU, in one batched call
            for encoded in started_workers(self._loader(shares, encoded=True)):
                yield decode_at_size([name for name, _ in encoded], [data for _, data in encoded], self.dataset.size,
                                     self.device)
            return
        for batch in started_workers(self._loader(shares)):
            yield torch.from_numpy(batch).to(self.device, non_blocking=True)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stacked_array(images: list[torch.Tensor]):
    """A worker's batch as a numpy array, sent pickled through the DataLoader's queue: measured, batches sent
    as torch's shared-memory tensors stayed mapped in the training process (its memory grew by the size of
    every batch read: 4 GB over 400,000 images), while this stays flat."""
    return torch.stack(images).numpy()


def decoding_loader(dataset: EncodedImages, batches: list[list[int]], workers: int, encoded: bool = False
                    ) -> torch.utils.data.DataLoader:
    """The one DataLoader of streamed images: `batches` in order, decoded batches as numpy arrays (or, with
    `encoded`, lists of (name, bytes)), workers that leave the stop signals to the trainer."""
    dataset.encoded_only = encoded
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, prefetch_factor=PREFETCH_BATCHES if workers else None,
        persistent_workers=False, collate_fn=list if encoded else stacked_array,
        worker_init_fn=leave_stop_signals_to_the_trainer)


def leave_stop_signals_to_the_trainer(worker: int) -> None:
    """A DataLoader worker ignores SIGTERM and SIGUSR1: a scheduler (SLURM, `timeout`) signals every process of
    the job, and a worker that died of it would crash the run before the trainer, which handles the same
    signal, writes its checkpoint; the trainer shuts its workers down itself. The workers start with these
    signals blocked (`started_workers`), so one sent while they start waits, and is then ignored here."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def started_workers(loader) -> Iterator:
    """iter(loader), its workers forked with the stop signals blocked (they inherit the mask); the trainer's
    own stop signals are held only for that moment, then delivered."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def encoded_source(config: DataConfig, split: str, on_corrupt: str) -> EncodedSource:
    """A split kept encoded: the image files of an image folder's split, or a shard folder's split."""
    root = Path(config.root).expanduser()
    if config.dataset == "shards":
        return ShardReader(root, split, on_corrupt)
    if not (root / split).is_dir():
        raise DataError(f"{root / split}: no such split folder; imagefolder expects {root}/<split>/<class>/*.jpg")
    paths, labels, classes, digest = list_images(root, split, config.image_size)
    return FileSource(paths, labels, classes, digest)


class FileSource:
    """Image files, read whole; `digest` identifies the list (names, sizes, dates)."""

    def __init__(self, paths: list[str], labels: torch.Tensor, classes: list[str], digest: str):
        self.paths, self.labels, self.classes, self.digest = paths, labels, classes, digest

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def read(self, index: int) -> bytes:
        try:
            with open(self.paths[index], "rb") as handle:
                return handle.read()
        except OSError as error:
            raise DataError(f"{self.paths[index]}: cannot read ({error.strerror})") from None


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_storage(config: DataConfig, count: int, device: torch.device) -> tuple[str, str]:
    """(memory | stream, why): data.storage, or for auto the decoded split's size against the device."""
    decoded = count * 3 * config.image_size ** 2
    available = device_memory_bytes(device)
    why = (f"{count} images decoded at {config.image_size} px take {decoded / 2**30:.2f} GiB; "
           f"{MEMORY_FRACTION:.0%} of the {device.type} memory is {MEMORY_FRACTION * available / 2**30:.1f} GiB")
    if config.storage != "auto":
        return config.storage, f"data.storage: {config.storage} ({why})"
    chosen = "memory" if decoded <= MEMORY_FRACTION * available else "stream"
    return chosen, f"data.storage auto -> {chosen}: {why}"


def training_images(config: DataConfig, seed: int, device: torch.device,
                    progress: Progress = no_progress) -> tuple[InMemoryImages | StreamedImages, str | None]:
    """The training split (after data.subset, a seeded choice) in the storage data.storage asks for, and the
    line that says which storage and why (None where there is no choice: a dataset that is not streamed).
    `progress` is told of the decoding of a split held in memory."""
    streamable = config.dataset in ("imagefolder", "shards") and not config.random_rotation
    if config.storage == "memory" or not streamable:
        if config.storage == "stream":
            raise HsslError(f"data.storage: stream reads image folders and shards (data.dataset imagefolder or "
                            f"shards, without random_rotation), not {config.dataset}; use memory or auto")
        images = _subset(load_split(config, config.train_split, progress=progress).images, config, seed)
        return InMemoryImages(images.to(device)), ("data.storage: memory" if streamable else None)
    source = encoded_source(config, config.train_split, config.on_corrupt)
    indices = _subset(torch.arange(len(source)), config, seed)
    storage, why = choose_storage(config, len(indices), device)
    if storage == "memory":
        images = _subset(load_split(config, config.train_split, progress=progress).images, config, seed)
        return InMemoryImages(images.to(device)), why
    dataset = EncodedImages(source, indices, config.image_size, config.on_corrupt)
    return StreamedImages(dataset, device, config.workers), why


def _subset(items: torch.Tensor, config: DataConfig, seed: int) -> torch.Tensor:
    """data.subset: a seeded random choice of the split's images, the same for both storages."""
    if config.subset is None or config.subset >= len(items):
        return items
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))
    return items[keep[:config.subset]]
