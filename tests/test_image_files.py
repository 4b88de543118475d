"""data/image_files.py, the one path from image bytes to pixels: the batched decode and its one-by-one fallback,
the per-image resize streaming uses against the batched one of the in-memory loader; and where data reports
its progress and keeps its caches."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, encode_jpeg

from hssl_cli.data.image_files import decode_images, encode_png, resize_each, resize_images
from hssl_cli.data.sources import load_split
from hssl_cli.errors import DataError
from hssl_cli.files import decoded_split_cache_dirs, default_cache_dir
from hssl_cli.recipe import DataConfig

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

BROKEN_JPEG = b"\xff\xd8\xff" + b"\x00" * 30


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_jpegs_decoded_in_one_batch_equal_single_decodes_and_a_corrupt_one_is_named():
    originals = [_image(8, 8, 0), _image(12, 10, 1), _image(9, 7, 2)]
    encoded = [encode_jpeg(originals[0], quality=95).numpy().tobytes(), encode_png(originals[1]),
               encode_jpeg(originals[2], quality=95).numpy().tobytes()]
    names = ["a.jpg", "b.png", "c.jpg"]
    decoded = decode_images(names, encoded)
    for image, data in zip(decoded, encoded, strict=True):
        alone = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert image.dtype == torch.uint8 and torch.equal(image, alone)
    assert torch.equal(decoded[1], originals[1])  # PNG: lossless
    with pytest.raises(DataError, match="broken.jpg: cannot decode this image"):
        decode_images([*names, "broken.jpg"], [*encoded, BROKEN_JPEG])
    with pytest.raises(DataError, match="empty.png: empty image file"):
        decode_images(["empty.png"], [b""])


def test_a_16_bit_png_is_decoded_to_its_top_8_bits():
    pixels = (np.arange(30).reshape(6, 5) * 2000).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    (image,) = decode_images(["deep.png"], [buffer.getvalue()])
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 5)
    assert torch.equal(image[0], torch.from_numpy((pixels >> 8).astype(np.uint8)))


def test_resizing_one_by_one_equals_resizing_a_batch_of_one_size():
    """Streaming resizes each image alone, the in-memory loader a batch of one size at once: the same pixels."""
    images = [_image(20, 20, seed) for seed in range(4)]
    assert torch.equal(resize_each(images, 16), resize_images(torch.stack(images), 16))
    mixed = resize_each([_image(16, 16, 5), _image(9, 30, 6)], 16)
    assert mixed.shape == (2, 3, 16, 16) and torch.equal(mixed[0], _image(16, 16, 5))


def test_a_loader_reports_its_decoding_through_the_progress_it_is_handed_and_a_cache_hit_reports_nothing(
        tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    root = tmp_path / "folder"
    for index in range(3):
        path = root / "train" / "cat" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(_image(8, 8, index)))
    reports = []

    @contextlib.contextmanager
    def recording(description: str, total: int):
        report = {"description": description, "total": total, "done": 0}
        reports.append(report)
        yield lambda count: report.update(done=report["done"] + count)

    config = DataConfig(dataset="imagefolder", root=str(root), image_size=8)
    first = load_split(config, "train", progress=recording)
    again = load_split(config, "train", progress=recording)
    assert reports == [{"description": f"decoding {root / 'train'}", "total": 3, "done": 3}]
    assert torch.equal(first.images, again.images)


def test_caches_are_kept_under_hssl_cache_dir_else_xdg_else_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setattr(Path, "home", lambda: home)
    monkeypatch.setenv("HSSL_CACHE_DIR", str(tmp_path / "hssl"))
    assert default_cache_dir("stats") == tmp_path / "hssl" / "stats"
    monkeypatch.delenv("HSSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hssl" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir("stats") == home / ".cache" / "hssl" / "stats"
    # the decoded splits sit beside their images; HSSL_CACHE_DIR does not move them
    assert decoded_split_cache_dirs(tmp_path / "data") == [tmp_path / "data" / ".hssl-cache", home / ".cache" / "hssl"]
