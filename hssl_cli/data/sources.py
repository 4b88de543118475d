"""Datasets -> uint8 images (N, C, H, W) on the CPU and int64 labels, at the recipe's image size.

Each source resizes once, here, with antialiased bilinear interpolation (only where the native size
differs from `data.image_size`), so training never resizes. Sources and their splits:

- digits: scikit-learn's built-in 8x8 digits (1797 images, values 0..16 scaled to 0..255).
  It has no official split, so "train"/"test" are a fixed stratified 80/20 split of it
  (sklearn's train_test_split, test_size=0.2, random_state=0, stratified by digit): 1437 and 360
  images, each kept in the original order. data.root is ignored.
- mnist: the four original IDX files (gzip or not) in data.root, or in data.root/MNIST/raw as
  torchvision lays them out. Splits train, test.
- cifar10: torchvision's reader of data.root/cifar-10-batches-py (official python version).
- stl10: torchvision's reader of data.root/stl10_binary. Splits train, test, unlabeled,
  train+unlabeled; unlabeled images have label -1.
- shards: a folder written by `hssl shards` (data/shards.py): its splits, decoded as imagefolder decodes.
- imagefolder: data.root/<split>/<class>/*.jpg|jpeg|png (any case; a split of images without class
  folders is unlabeled, label -1: a pretraining source); classes are the sorted class
  folder names and a label is its class's index. Decoded once, then cached as safetensors in
  data.root/.hssl-cache/ (or ~/.cache/hssl/ when data.root is not writable), keyed on the file
  list (relative paths, sizes, mtimes) and the image size, so a changed folder is decoded again
  (and the folder's cache it replaces is deleted).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import re
import struct
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from hssl_cli.errors import DataError
from hssl_cli.files import decoded_split_cache_dirs, save_safetensors_atomically
from hssl_cli.progress import Progress, no_progress
from hssl_cli.recipe import DataConfig

SPLITS = {
    "digits": ("train", "test"),
    "mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
DIGIT_CLASSES = [str(digit) for digit in range(10)]
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_GLOB = "*.jpg|jpeg|png"
CACHE_FORMAT = "hssl-imagefolder-cache/1"
DECODE_CHUNK = 1024  # files read and decoded per batch: bounds the memory held by encoded bytes
RESIZE_CHUNK = 4096  # images resized per call: bounds the temporary memory of large splits
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 (N, C, image_size, image_size), C = 1 (digits, mnist) or 3, CPU, contiguous
    labels: torch.Tensor  # int64 (N,), -1 where unlabeled (stl10 'unlabeled')
    classes: list[str]


def load_split(config: DataConfig, split: str, progress: Progress = no_progress) -> ImageSplit:
    """Load one split of the recipe's dataset at `config.image_size`; a user's mistake is a DataError.
    `progress` is told of the decoding of an image folder or shards (not of a cache hit)."""
    if config.random_rotation:  # one fixed angle per image, the same wherever the split is loaded
        from hssl_cli.data.groups import random_rotation_angles, rotate_uint8

        upright = load_split(config.model_copy(update={"random_rotation": False}), split, progress)
        angles = random_rotation_angles(len(upright.labels), split)
        return ImageSplit(rotate_uint8(upright.images, angles), upright.labels, upright.classes)
    if config.dataset == "digits":
        _check_split("digits", split, SPLITS["digits"])
        data = _load_digits(split)
    else:
        if config.root is None:
            raise DataError(f"data.root is required for dataset '{config.dataset}': set it to its folder")
        root = Path(config.root).expanduser()
        if config.dataset == "imagefolder":
            return _load_imagefolder(root, split, config.image_size, progress)
        if config.dataset == "shards":
            return _load_shards(root, split, config.image_size, config.on_corrupt, progress)
        _check_split(config.dataset, split, SPLITS[config.dataset])
        loaders = {"mnist": _load_mnist, "cifar10": _load_cifar10, "stl10": _load_stl10}
        try:
            data = loaders[config.dataset](root, split)
        except DataError as error:
            if _looks_like_imagefolder(root):
                raise DataError(f"{error}. {root} looks like an image-folder tree ({split}/<class>/<image>): "
                                "set data.dataset: imagefolder") from None
            raise
    return ImageSplit(resize_images(data.images, config.image_size), data.labels, data.classes)


def _load_shards(root: Path, split: str, size: int, on_corrupt: str, progress: Progress) -> ImageSplit:
    """Every sample of a shard folder's split (hssl shards), decoded at `size`."""
    from hssl_cli.data.shards import ShardReader

    reader = ShardReader(root, split, on_corrupt)
    images = torch.empty((len(reader), 3, size, size), dtype=torch.uint8)
    with progress(f"decoding {root} ({split})", len(reader)) as advance:
        for start in range(0, len(reader), DECODE_CHUNK):
            indices = list(range(start, min(start + DECODE_CHUNK, len(reader))))
            images[start:start + len(indices)] = reader.images(indices, size)
            advance(len(indices))
    return ImageSplit(images, reader.labels, reader.classes)


def _looks_like_imagefolder(root: Path) -> bool:
    """root/<split>/<class>/ folders holding image files (e.g. the CIFAR-10 JPEG copy)."""
    for split_folder in (root / "train", root / "test"):
        for class_folder in sorted(split_folder.glob("*"))[:3] if split_folder.is_dir() else []:
            if class_folder.is_dir() and any(class_folder.glob("*.[jpJP][pnPN]*")):
                return True
    return False


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear; contiguous either way."""
    if tuple(images.shape[-2:]) == (size, size):
        return images.contiguous()
    resized = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), RESIZE_CHUNK):
        batch = images[start : start + RESIZE_CHUNK].contiguous()
        resized[start : start + RESIZE_CHUNK] = F.interpolate(
            batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return resized


def _check_split(dataset: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise DataError(
            f"unknown split '{split}' for dataset '{dataset}'; valid splits: {', '.join(valid)} "
            "(set data.train_split / data.test_split)"
        )


def _load_digits(split: str) -> ImageSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    chosen = np.sort(train if split == "train" else test)
    pixels = np.rint(digits.images[chosen] * (255 / 16)).astype(np.uint8)
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    return ImageSplit(torch.from_numpy(pixels).unsqueeze(1), labels, list(DIGIT_CLASSES))


def _load_mnist(root: Path, split: str) -> ImageSplit:
    image_name, label_name = MNIST_FILES[split]
    image_path, label_path = _find_mnist_file(root, image_name), _find_mnist_file(root, label_name)
    images = _read_idx(image_path, ndim=3)
    labels = _read_idx(label_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{label_path}: {len(labels)} labels for the {len(images)} images of {image_path}; "
            "the two files come from different sets, restore the original MNIST files"
        )
    if int(labels.max()) > 9:
        raise DataError(f"{label_path}: labels above 9, so not MNIST labels; restore the original MNIST file")
    return ImageSplit(images.unsqueeze(1), labels.long(), list(DIGIT_CLASSES))


def _find_mnist_file(root: Path, name: str) -> Path:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(
        f"{root / name}[.gz]: MNIST file not found; data.root must hold the original IDX files "
        f"{', '.join(sum(MNIST_FILES.values(), ()))} (gzipped or not)"
    )


def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file of unsigned bytes: magic 00 00 08 <ndim>, ndim big-endian int32 sizes, the data."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(
                f"{path}: corrupt gzip file ({_reason(error)}); restore the original MNIST file"
            ) from None
    expected = f"an IDX file of unsigned bytes with {ndim} dimension(s), magic 000008{ndim:02x}"
    if raw[:4] != bytes((0, 0, 8, ndim)):
        found = raw[:4].hex() or "an empty file"
        raise DataError(f"{path}: not {expected} (found {found}); restore the original MNIST file")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header; restore the original MNIST file")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    count = math.prod(dims)
    if count == 0 or len(raw) - header_size != count:
        raise DataError(
            f"{path}: the IDX header promises {'x'.join(map(str, dims))} = {count} bytes but "
            f"{len(raw) - header_size} follow; the file is truncated or corrupt, restore the original file"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header_size).view(*dims)


def _load_cifar10(root: Path, split: str) -> ImageSplit:
    from torchvision.datasets import CIFAR10

    if root.name == CIFAR10.base_folder:  # data.root given as the batches folder itself
        root = root.parent
    try:
        dataset = CIFAR10(str(root), train=split == "train", download=False)
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise DataError(
            f"{root / CIFAR10.base_folder}: CIFAR-10 missing or corrupt{_detail(error)}; expected "
            f"data_batch_1..5, test_batch and batches.meta there: extract the official "
            f"cifar-10-python.tar.gz into {root}"
        ) from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    return ImageSplit(images, torch.tensor(dataset.targets, dtype=torch.int64), list(dataset.classes))


def _load_stl10(root: Path, split: str) -> ImageSplit:
    from torchvision.datasets import STL10

    if root.name == STL10.base_folder:
        root = root.parent
    try:
        dataset = STL10(str(root), split=split, download=False)
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise DataError(
            f"{root / STL10.base_folder}: STL-10 missing or corrupt{_detail(error)}; expected train_X.bin, "
            f"train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin there: extract the official "
            f"stl10_binary.tar.gz into {root}"
        ) from None
    labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    classes = list(getattr(dataset, "classes", STL10_CLASSES))  # set only when class_names.txt exists
    return ImageSplit(torch.from_numpy(dataset.data), labels, classes)


def _detail(error: Exception) -> str:
    # torchvision's RuntimeError here only says "not found or corrupted, use download=True"
    return "" if isinstance(error, RuntimeError) else f" ({_reason(error)})"


def _reason(error: Exception) -> str:
    """The first line of a library's error, so that a DataError stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_imagefolder(root: Path, split: str, size: int, progress: Progress) -> ImageSplit:
    layout = f"{root}/<split>/<class>/{IMAGE_GLOB}"
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; imagefolder expects {layout}")
    splits = _visible_folders(root)
    if split not in splits:
        raise DataError(
            f"{root / split}: no such split folder; imagefolder expects {layout}, "
            f"valid splits here: {', '.join(splits) or 'none'}"
        )
    paths, labels, classes, digest = _list_images(root, split, size)
    name = f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', split)}-{size}px-{digest[:24]}.safetensors"
    for folder in decoded_split_cache_dirs(root):
        cached = _read_cache(folder / name, labels, classes, size)
        if cached is not None:
            return cached
    images = _decode_files(paths, size, progress, f"decoding {root / split}")
    data = ImageSplit(images, labels, classes)
    _write_cache(root, name, data)
    return data


def _list_images(root: Path, split: str, size: int) -> tuple[list[str], torch.Tensor, list[str], str]:
    """Image paths and labels in class-then-name order, the classes, and the cache key of the list."""
    split_dir = root / split
    classes = _visible_folders(split_dir)
    if not classes:
        loose = sorted((entry for entry in os.scandir(split_dir) if _is_image(entry)), key=lambda entry: entry.name)
        if loose:  # images without class folders: an unlabeled split (label -1), for pretraining
            return _unlabeled_list(split, loose, size)
        raise DataError(
            f"{split_dir}: no class folders and no images; imagefolder expects {split_dir}/<class>/{IMAGE_GLOB} "
            f"(or, unlabeled, {split_dir}/{IMAGE_GLOB})"
        )
    key = hashlib.sha256(f"{CACHE_FORMAT}\n{size}\n{json.dumps(classes)}\n".encode())
    paths: list[str] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        for entry in sorted(os.scandir(split_dir / class_name), key=lambda entry: entry.name):
            if not _is_image(entry):
                continue
            stat = entry.stat()
            key.update(os.fsencode(f"{split}/{class_name}/{entry.name}"))
            key.update(f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            paths.append(entry.path)
            labels.append(label)
    if not paths:
        raise DataError(
            f"{split_dir}: no .jpg/.jpeg/.png images in its class folders ({', '.join(classes)}); "
            f"imagefolder expects {split_dir}/<class>/{IMAGE_GLOB}"
        )
    return paths, torch.tensor(labels, dtype=torch.int64), classes, key.hexdigest()


def _unlabeled_list(split: str, entries: list[os.DirEntry], size: int
                    ) -> tuple[list[str], torch.Tensor, list[str], str]:
    key = hashlib.sha256(f"{CACHE_FORMAT}\n{size}\nunlabeled\n".encode())
    for entry in entries:
        stat = entry.stat()
        key.update(os.fsencode(f"{split}/{entry.name}") + f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    paths = [entry.path for entry in entries]
    return paths, torch.full((len(paths),), -1, dtype=torch.int64), [], key.hexdigest()


def _is_image(entry: os.DirEntry) -> bool:
    # hidden files include macOS's '._name.jpg' resource forks, which are not images
    name = entry.name
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()


def _visible_folders(folder: Path) -> list[str]:
    """Sorted names of the subfolders, leaving out hidden ones such as .hssl-cache."""
    return sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )


def _decode_files(paths: list[str], size: int, progress: Progress, description: str) -> torch.Tensor:
    """Read and decode image files to uint8 RGB (N, 3, size, size), resizing those of another size."""
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with progress(description, len(paths)) as advance:
        for start in range(0, len(paths), DECODE_CHUNK):
            decoded = _decode_chunk(paths[start : start + DECODE_CHUNK])
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for offset, image in enumerate(decoded):
                by_shape[tuple(image.shape)].append(offset)
            for offsets in by_shape.values():
                batch = torch.stack([decoded[offset] for offset in offsets])
                images[torch.tensor(offsets) + start] = resize_images(batch, size)
            advance(len(decoded))
    return images


def _decode_chunk(paths: list[str]) -> list[torch.Tensor]:
    encoded = []
    for path in paths:
        with open(path, "rb") as handle:
            encoded.append(handle.read())
    return decode_encoded(paths, encoded)


def decode_encoded(paths: list[str], encoded: list[bytes]) -> list[torch.Tensor]:
    """Encoded JPEG/PNG bytes -> uint8 RGB (3, H, W) each (JPEGs in one batched call); `paths` name them in
    errors (a file, or a shard's member)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    decoded: list[torch.Tensor | None] = [None] * len(paths)
    jpegs = [index for index, data in enumerate(encoded) if data.startswith(JPEG_MAGIC)]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; nothing for a user to act on
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        if jpegs:
            # on a corrupt file the whole batch fails; the loop below then decodes one by one and names it
            with contextlib.suppress(RuntimeError):
                batch = decode_jpeg([_as_tensor(paths[i], encoded[i]) for i in jpegs], mode=ImageReadMode.RGB)
                for index, image in zip(jpegs, batch, strict=True):
                    decoded[index] = image
        for index, image in enumerate(decoded):
            if image is None:
                path = paths[index]
                try:
                    decoded[index] = decode_image(_as_tensor(path, encoded[index]), mode=ImageReadMode.RGB)
                except (RuntimeError, ValueError) as error:
                    raise DataError(
                        f"{path}: cannot decode this image ({_reason(error)}); fix or delete it"
                    ) from None
    return [_to_uint8(image) for image in decoded if image is not None]


def _as_tensor(path: str, data: bytes) -> torch.Tensor:
    if not data:
        raise DataError(f"{path}: empty image file; fix or delete it")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint16:  # 16-bit PNG
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _read_cache(path: Path, labels: torch.Tensor, classes: list[str], size: int) -> ImageSplit | None:
    """The cached split, or None when absent, unreadable or not matching (then it is rebuilt)."""
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
    return ImageSplit(images.contiguous(), cached_labels, classes) if valid else None


def _write_cache(root: Path, name: str, data: ImageSplit) -> None:
    tensors = {"images": data.images, "labels": data.labels}
    metadata = {"format": CACHE_FORMAT, "classes": json.dumps(data.classes), "source": str(root)}
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
