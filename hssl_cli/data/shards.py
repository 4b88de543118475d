"""`hssl shards`: an image folder packed into tar shards, and random access to them by sample index.

Layout (webdataset's): OUT/<split>-NNNNNN.tar, each holding, per sample, `IIIIIIII.jpg|png` (the image's
bytes: the original file, or with `size` the image resized as the in-memory loader resizes it, then PNG,
lossless) and `IIIIIIII.cls` (its class index, ASCII; absent for an unlabeled folder), I the sample's index
in the split (class-then-name order, the in-memory loader's). OUT/manifest.json, written last and
atomically, lists every shard (samples, bytes, SHA-256) and each split's classes: a folder without it is
an unfinished pack. Shards are plain (uncompressed) tars, so a sample is read by one seek: the order of
reading is free (a per-epoch permutation, a rank's share), and a truncated or corrupt shard is found by
its member offsets, naming the shard and the sample, never by a read that blocks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from hssl_cli.data.image_files import (
    IMAGE_SUFFIXES,
    decode_at_size,
    encode_png,
    is_image,
    list_images,
    read_images,
    resize_each,
    visible_folders,
)
from hssl_cli.errors import DataError
from hssl_cli.files import write_text_atomically
from hssl_cli.progress import Progress, no_progress

MANIFEST = "manifest.json"
FORMAT = "hssl-shards/1"
ON_CORRUPT = ("stop", "skip")


def split_names(folder: Path) -> list[str]:
    """The folder's splits: its visible subfolders that hold class folders, or, for a folder of images
    alone (an unlabeled pretraining source), the one split `train`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; hssl shards packs <folder>/<split>/<class>/*.jpg|png, or a "
                        "folder of images")
    splits = [name for name in visible_folders(folder) if visible_folders(folder / name)]
    if splits:
        return splits
    if any(name.lower().endswith(IMAGE_SUFFIXES) for name in os.listdir(folder)):
        return ["train"]
    raise DataError(f"{folder}: neither <split>/<class>/ folders nor images; hssl shards packs "
                    "<folder>/<split>/<class>/*.jpg|png, or a folder of images")


def _unlabeled_images(folder: Path) -> list[str]:
    return [entry.path for entry in sorted(os.scandir(folder), key=lambda entry: entry.name) if is_image(entry)]


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no dates, owners: the same folder, the same bytes
    return info, io.BytesIO(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_folder(folder: Path, out: Path, splits: list[str] | None = None, per_shard: int = 10_000,
                size: int | None = None, progress: Progress = no_progress) -> dict:
    """Write every split of `folder` as shards of at most `per_shard` samples into `out`, then the manifest;
    returns the manifest. `size`: resize every image to size x size (antialiased bilinear, the in-memory
    loader's) and store it as PNG; else the files' own bytes. Refuses an `out` that already holds a pack.
    `progress` is told of each split's packing."""
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard}: at least 1 image per shard")
    available = split_names(folder)
    unknown = [name for name in splits or [] if name not in available]
    if unknown:
        raise DataError(f"{folder / unknown[0]}: no such split; this folder has {', '.join(available)}")
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds shards ({MANIFEST}); choose another output folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "source": str(folder), "size": size, "splits": {}}
    for split in splits or available:
        if (folder / split).is_dir():
            paths, labels, classes, _ = list_images(folder, split, size or 0)
            labels = labels.tolist()
        else:  # a folder of images: one unlabeled split
            paths, classes = _unlabeled_images(folder), []
            labels = [-1] * len(paths)
        shards = []
        with progress(f"packing {split}", len(paths)) as advance:
            for start in range(0, len(paths), per_shard):
                name = f"{split}-{len(shards):06d}.tar"
                shards.append(_write_shard(out / name, paths[start:start + per_shard],
                                           labels[start:start + per_shard], start, size))
                advance(shards[-1]["count"])
        manifest["splits"][split] = {"count": len(paths), "classes": classes, "shards": shards}
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_shard(path: Path, paths: list[str], labels: list[int], first: int, size: int | None) -> dict:
    """One shard, written to a temporary name and renamed: a killed pack leaves no half shard behind."""
    if size is not None:
        encoded = [(encode_png(image), "png") for image in resize_each(read_images(paths), size)]
    else:
        encoded = []
        for file in paths:
            with open(file, "rb") as handle:
                encoded.append((handle.read(), "png" if file.lower().endswith(".png") else "jpg"))
    temporary = path.with_name(f".{path.name}.partial")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
        for offset, ((data, suffix), label) in enumerate(zip(encoded, labels, strict=True)):
            index = first + offset
            archive.addfile(*_member(f"{index:08d}.{suffix}", data))
            if label >= 0:
                archive.addfile(*_member(f"{index:08d}.cls", str(label).encode()))
    os.replace(temporary, path)
    return {"file": path.name, "first": first, "count": len(paths), "bytes": path.stat().st_size,
            "sha256": _sha256(path)}


@dataclass
class Sample:
    shard: int  # index into ShardReader.shards
    offset: int  # byte offset of the image's data in the shard
    size: int
    name: str  # the member's name, for errors


class ShardReader:
    """Random access to one split of a shard folder: sample index -> encoded bytes, its label.

    Opening scans every shard's tar headers (not the images): a shard that is missing, shorter than its
    members say, or holding other samples than the manifest lists is found here. With on_corrupt `stop` it
    is an error naming the shard and the first unreadable sample; with `skip` those samples are left out
    (`len` counts the readable ones; `skipped` names the others)."""

    def __init__(self, folder: str | Path, split: str, on_corrupt: str = "stop"):
        if on_corrupt not in ON_CORRUPT:
            raise DataError(f"data.on_corrupt: {on_corrupt}; one of {', '.join(ON_CORRUPT)}")
        self.folder, self.split, self.on_corrupt = Path(folder).expanduser(), split, on_corrupt
        manifest = read_manifest(self.folder)
        if split not in manifest["splits"]:
            raise DataError(f"{self.folder}: no split '{split}' in its shards; it has "
                            f"{', '.join(manifest['splits'])}")
        entry = manifest["splits"][split]
        self.classes: list[str] = entry["classes"]
        self.shards: list[Path] = [self.folder / shard["file"] for shard in entry["shards"]]
        self.samples: list[Sample] = []
        labels: list[int] = []
        self.skipped: list[str] = []
        for number, shard in enumerate(entry["shards"]):
            found, shard_labels = self._scan(number, shard)
            self.samples += found
            labels += shard_labels
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._handles: dict[int, tuple[int, object]] = {}
        # identifies what this reader reads: the shards' checksums, and which samples were readable
        self.digest = hashlib.sha256(json.dumps([entry["shards"], self.skipped]).encode()).hexdigest()

    def _corrupt(self, message: str, missing: list[str]) -> None:
        if self.on_corrupt == "stop":
            raise DataError(f"{message}; re-pack the folder with hssl shards, or set data.on_corrupt: skip")
        warnings.warn(f"{message}: {len(missing)} sample(s) skipped (data.on_corrupt: skip)", stacklevel=3)
        self.skipped += missing

    def _scan(self, number: int, shard: dict) -> tuple[list[Sample], list[int]]:
        path, first, count = self.shards[number], shard["first"], shard["count"]
        expected = [f"{index:08d}" for index in range(first, first + count)]
        if not path.is_file():
            self._corrupt(f"{path}: shard missing (samples {first}-{first + count - 1})", expected)
            return [], []
        length = path.stat().st_size
        images: dict[str, tuple[int, int, str]] = {}
        classes: dict[str, int] = {}
        try:
            with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    stem, _, suffix = member.name.partition(".")
                    if member.offset_data + member.size > length:
                        break  # truncated inside this member's data
                    if suffix == "cls":
                        handle.seek(member.offset_data)
                        classes[stem] = int(handle.read(member.size))
                    elif suffix in ("jpg", "jpeg", "png"):
                        images[stem] = (member.offset_data, member.size, member.name)
        except (tarfile.TarError, ValueError, OSError) as error:
            reason = f"unreadable ({type(error).__name__}: {error})"
        else:
            reason = "truncated or incomplete"
        found, labels, missing = [], [], []
        for stem in expected:
            if stem not in images:
                missing.append(stem)
                continue
            offset, size, name = images[stem]
            found.append(Sample(number, offset, size, name))
            labels.append(classes.get(stem, -1))
        if missing:
            self._corrupt(f"{path}: shard {reason}, sample {int(missing[0])} ({missing[0]}.*) and "
                          f"{len(missing) - 1} more cannot be read", missing)
        return found, labels

    def __len__(self) -> int:
        return len(self.samples)

    def _handle(self, shard: int):
        pid = os.getpid()  # a DataLoader worker opens its own files
        cached = self._handles.get(shard)
        if cached is None or cached[0] != pid:
            cached = (pid, open(self.shards[shard], "rb"))  # noqa: SIM115 (kept open across reads)
            self._handles[shard] = cached
        return cached[1]

    def read(self, index: int) -> bytes:
        """The encoded image of readable sample `index` (0 <= index < len)."""
        sample = self.samples[index]
        handle = self._handle(sample.shard)
        handle.seek(sample.offset)
        data = handle.read(sample.size)
        if len(data) != sample.size:  # the file shrank since it was opened
            raise DataError(f"{self.shards[sample.shard]}: sample {sample.name} ends early (shard truncated); "
                            "re-pack the folder with hssl shards")
        return data

    def name(self, index: int) -> str:
        sample = self.samples[index]
        return f"{self.shards[sample.shard]}:{sample.name}"

    def images(self, indices: list[int], size: int) -> torch.Tensor:
        """Decoded uint8 RGB (B, 3, size, size) of these samples, resized as the in-memory loader resizes."""
        return decode_at_size([self.name(i) for i in indices], [self.read(i) for i in indices], size)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST}: not a shard folder, or an unfinished pack; pack one with "
                        "hssl shards FOLDER OUT")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                shard["file"], shard["first"], shard["count"]  # noqa: B018 (the keys a reader needs)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable shard manifest ({error}); re-pack with hssl shards") from None
    return manifest
