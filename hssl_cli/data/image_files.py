"""Image files: an image folder's listing, JPEG/PNG bytes decoded to uint8 RGB, images resized to the working size.

Every path from image bytes to pixels comes through here (the in-memory loader, streaming's DataLoader workers
and its GPU decoding, shards packed and read), so a streamed or sharded image is decoded and resized as the
in-memory one is. Resizing is antialiased bilinear, done once, where the native size differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from hssl_cli.errors import DataError, first_line
from hssl_cli.progress import Progress, no_progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_GLOB = "*.jpg|jpeg|png"
# hashed into every listing's digest, which names the decoded-split caches and keys the streamed channel
# statistics: kept as first written, so that the caches written so far still hit
LISTING_FORMAT = "hssl-imagefolder-cache/1"
DECODE_CHUNK = 1024  # files read and decoded per batch: bounds the memory held by encoded bytes
RESIZE_CHUNK = 4096  # images resized per call: bounds the temporary memory of large splits
JPEG_MAGIC = b"\xff\xd8\xff"
CPU = torch.device("cpu")


def is_image(entry: os.DirEntry) -> bool:
    # hidden files include macOS's '._name.jpg' resource forks, which are not images
    name = entry.name
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()


def visible_folders(folder: Path) -> list[str]:
    """Sorted names of the subfolders, leaving out hidden ones such as .hssl-cache."""
    return sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )


def list_images(root: Path, split: str, size: int) -> tuple[list[str], torch.Tensor, list[str], str]:
    """Image paths and labels of root/split in class-then-name order, the classes, and the digest of the list
    (relative paths, sizes, mtimes, and `size`): a changed folder has another digest."""
    split_dir = root / split
    classes = visible_folders(split_dir)
    if not classes:
        loose = sorted((entry for entry in os.scandir(split_dir) if is_image(entry)), key=lambda entry: entry.name)
        if loose:  # images without class folders: an unlabeled split (label -1), for pretraining
            return _unlabeled_list(split, loose, size)
        raise DataError(
            f"{split_dir}: no class folders and no images; imagefolder expects {split_dir}/<class>/{IMAGE_GLOB} "
            f"(or, unlabeled, {split_dir}/{IMAGE_GLOB})"
        )
    key = hashlib.sha256(f"{LISTING_FORMAT}\n{size}\n{json.dumps(classes)}\n".encode())
    paths: list[str] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        for entry in sorted(os.scandir(split_dir / class_name), key=lambda entry: entry.name):
            if not is_image(entry):
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
    key = hashlib.sha256(f"{LISTING_FORMAT}\n{size}\nunlabeled\n".encode())
    for entry in entries:
        stat = entry.stat()
        key.update(os.fsencode(f"{split}/{entry.name}") + f"\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    paths = [entry.path for entry in entries]
    return paths, torch.full((len(paths),), -1, dtype=torch.int64), [], key.hexdigest()


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) on the CPU -> uint8 (N, C, size, size), antialiased bilinear; contiguous either way."""
    if tuple(images.shape[-2:]) == (size, size):
        return images.contiguous()
    resized = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), RESIZE_CHUNK):
        batch = images[start : start + RESIZE_CHUNK].contiguous()
        resized[start : start + RESIZE_CHUNK] = F.interpolate(
            batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return resized


def resize_each(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (C, H, W) images of any sizes, on one device -> uint8 (B, C, size, size) there. On the CPU each is
    resized by resize_images; on CUDA, which has no antialiased uint8 interpolation, in float, then rounded:
    within rounding of the CPU's pixels, not bit for bit."""
    return torch.stack([_resize_one(image, size) for image in images])


def _resize_one(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.device.type == "cpu":
        return resize_images(image[None], size)[0]
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.round().clamp(0, 255).byte()[0]


@contextlib.contextmanager
def _quiet_torchvision() -> Iterator[None]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; nothing for a user to act on
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        yield


def decode_images(names: list[str], encoded: list[bytes], device: torch.device = CPU) -> list[torch.Tensor]:
    """Encoded JPEG/PNG bytes -> uint8 RGB (3, H, W) each, on `device`: the JPEGs in one batched call there
    (nvJPEG on CUDA); the others, or every JPEG when a corrupt one fails the batch, one by one on the CPU, where
    an image that cannot be decoded is a DataError naming it (`names`: a file, or a shard's member)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded: list[torch.Tensor | None] = [None] * len(names)
    jpegs = [index for index, data in enumerate(encoded) if data.startswith(JPEG_MAGIC)]
    with _quiet_torchvision():
        if jpegs:
            with contextlib.suppress(RuntimeError):
                batch = decode_jpeg([_as_tensor(names[i], encoded[i]) for i in jpegs], mode=ImageReadMode.RGB,
                                    device=device)
                for index, image in zip(jpegs, batch, strict=True):
                    decoded[index] = image
        return [_decode_one(names[index], encoded[index]).to(device) if image is None else image
                for index, image in enumerate(decoded)]


def _decode_one(name: str, data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(_as_tensor(name, data), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as error:
        raise DataError(f"{name}: cannot decode this image ({first_line(error)}); fix or delete it") from None
    if image.dtype == torch.uint16:  # 16-bit PNG
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _as_tensor(name: str, data: bytes) -> torch.Tensor:
    if not data:
        raise DataError(f"{name}: empty image file; fix or delete it")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_at_size(names: list[str], encoded: list[bytes], size: int, device: torch.device = CPU) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 RGB (B, 3, size, size) on `device`: decode_images, then resize_each. On
    CUDA the decoder and the resize's rounding differ from the CPU's: a streamed GPU run matches an in-memory
    one within decoding differences, not bit for bit; on the CPU it is the in-memory loader's pixels."""
    return resize_each(decode_images(names, encoded, device), size)


def read_images(paths: list[str]) -> list[torch.Tensor]:
    """Image files read whole and decoded: uint8 RGB (3, H, W) each, at their own sizes."""
    encoded = []
    for path in paths:
        with open(path, "rb") as handle:
            encoded.append(handle.read())
    return decode_images(paths, encoded)


def decode_files(paths: list[str], size: int, progress: Progress = no_progress, description: str = "decoding"
                 ) -> torch.Tensor:
    """Image files read and decoded to uint8 RGB (N, 3, size, size), DECODE_CHUNK at a time, those of one size
    resized together."""
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with progress(description, len(paths)) as advance:
        for start in range(0, len(paths), DECODE_CHUNK):
            decoded = read_images(paths[start : start + DECODE_CHUNK])
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for offset, image in enumerate(decoded):
                by_shape[tuple(image.shape)].append(offset)
            for offsets in by_shape.values():
                batch = torch.stack([decoded[offset] for offset in offsets])
                images[torch.tensor(offsets) + start] = resize_images(batch, size)
            advance(len(decoded))
    return images


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W) -> the bytes of a PNG file (lossless)."""
    from torchvision.io import encode_png as torchvision_encode_png

    with _quiet_torchvision():
        return torchvision_encode_png(image).numpy().tobytes()
