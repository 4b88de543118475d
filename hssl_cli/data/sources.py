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
- cifar100, cifar100_coarse: data.root/cifar-100-python (official python version), read as torchvision's CIFAR100
  reads it, without its md5 check; cifar100 labels the 100 classes, cifar100_coarse the 20 superclasses of the
  same images. Splits train, test.
- stl10: torchvision's reader of data.root/stl10_binary. Splits train, test, unlabeled,
  train+unlabeled; unlabeled images have label -1.
- shards: a folder written by `hssl shards` (data/shards.py): its splits, decoded as imagefolder decodes.
- imagefolder: data.root/<split>/<class>/*.jpg|jpeg|png (any case; a split of images without class
  folders is unlabeled, label -1: a pretraining source); classes are the sorted class
  folder names and a label is its class's index (data/image_files.py). Decoded once, then cached
  (data/decoded_cache.py): in data.root/.hssl-cache/, or ~/.cache/hssl/ when data.root is not writable.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hssl_cli.data.decoded_cache import cache_name, read_decoded, write_decoded
from hssl_cli.data.image_files import (
    DECODE_CHUNK,
    IMAGE_GLOB,
    decode_files,
    list_images,
    resize_images,
    visible_folders,
)
from hssl_cli.data.shards import ShardReader
from hssl_cli.errors import DataError, first_line
from hssl_cli.progress import Progress, no_progress
from hssl_cli.recipe import DataConfig

SPLITS = {
    "digits": ("train", "test"),
    "mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "cifar100_coarse": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
}
DIGIT_CLASSES = [str(digit) for digit in range(10)]
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_LABELS = {  # dataset -> (its labels' key in the train/test files, its class names' key in meta)
    "cifar100": ("fine_labels", "fine_label_names"),
    "cifar100_coarse": ("coarse_labels", "coarse_label_names"),
}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
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
        loaders = {"mnist": _load_mnist, "cifar10": _load_cifar10, "stl10": _load_stl10,
                   "cifar100": partial(_load_cifar100, dataset="cifar100"),
                   "cifar100_coarse": partial(_load_cifar100, dataset="cifar100_coarse")}
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
                f"{path}: corrupt gzip file ({first_line(error)}); restore the original MNIST file"
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


def _load_cifar100(root: Path, split: str, dataset: str) -> ImageSplit:
    """The official python version's `train` or `test` file and `meta`, read as torchvision's CIFAR100 reads
    them: the same images and fine labels in the same order, the same class names. Its md5 check of the files is
    left out: the coarse labels, which torchvision does not expose, come from the same read, and the checks below
    name what is wrong with a file."""
    if root.name == CIFAR100_FOLDER:  # data.root given as the folder itself
        root = root.parent
    folder = root / CIFAR100_FOLDER
    if not folder.is_dir():
        raise DataError(f"{folder}: CIFAR-100 not found; expected train, test and meta there: extract the official "
                        f"cifar-100-python.tar.gz into {root}")
    labels_key, names_key = CIFAR100_LABELS[dataset]
    entry, meta = _read_cifar100_file(folder / split), _read_cifar100_file(folder / "meta")
    path = folder / split
    pixels, labels, classes = entry.get("data"), entry.get(labels_key), meta.get(names_key)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"{path}: 'data' is not uint8 rows of 3072 bytes (3x32x32) but {found}; restore the file "
                        "from the official cifar-100-python.tar.gz")
    if not isinstance(classes, list) or not isinstance(labels, list) or len(labels) != len(pixels):
        raise DataError(f"{path}: no '{labels_key}' for each of its {len(pixels)} images, or {folder / 'meta'} has "
                        f"no '{names_key}'; restore the files from the official cifar-100-python.tar.gz")
    targets = torch.tensor(labels, dtype=torch.int64)
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(classes):
        raise DataError(f"{path}: '{labels_key}' outside 0..{len(classes) - 1} ({len(classes)} '{names_key}' in "
                        "meta); restore the files from the official cifar-100-python.tar.gz")
    images = torch.from_numpy(np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32)))  # rows are R, G, B planes
    return ImageSplit(images, targets, [_latin1_text(name) for name in classes])


def _read_cifar100_file(path: Path) -> dict:
    """One pickled dict of the official python version, its (Python 2) keys read as text."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; restore it from the official cifar-100-python.tar.gz")
    # Unpickling runs whatever the file says, as in torchvision's reader of the same files (pickle.load,
    # encoding latin1): these are the official dataset files, trusted exactly as far as torchvision trusts them.
    try:
        with path.open("rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as error:
        raise DataError(f"{path}: not a readable CIFAR-100 file ({first_line(error)}); restore it from the "
                        "official cifar-100-python.tar.gz") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: holds a {type(entry).__name__}, not the dict of a CIFAR-100 file; restore it "
                        "from the official cifar-100-python.tar.gz")
    return {_latin1_text(key): value for key, value in entry.items()}


def _latin1_text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


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
    return "" if isinstance(error, RuntimeError) else f" ({first_line(error)})"


def _load_imagefolder(root: Path, split: str, size: int, progress: Progress) -> ImageSplit:
    layout = f"{root}/<split>/<class>/{IMAGE_GLOB}"
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; imagefolder expects {layout}")
    splits = visible_folders(root)
    if split not in splits:
        raise DataError(
            f"{root / split}: no such split folder; imagefolder expects {layout}, "
            f"valid splits here: {', '.join(splits) or 'none'}"
        )
    paths, labels, classes, digest = list_images(root, split, size)
    name = cache_name(split, size, digest)
    images = read_decoded(root, name, labels, classes, size)
    if images is None:
        images = decode_files(paths, size, progress, f"decoding {root / split}")
        write_decoded(root, name, images, labels, classes)
    return ImageSplit(images, labels, classes)
