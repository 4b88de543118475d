"""Dataset sources: digits, MNIST IDX files, imagefolder with its decoded-image cache, error paths."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torchvision.io import decode_jpeg, encode_jpeg, encode_png

from hssl_cli.data import sources
from hssl_cli.data.image_files import resize_images
from hssl_cli.data.sources import load_split
from hssl_cli.errors import DataError
from hssl_cli.recipe import DataConfig
from hssl_cli.render import progress_bars

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # shared/ sits beside the repo
MNIST_DIR = DATASETS / "mnist"
CIFAR_JPEG = DATASETS / "cifar10-jpeg.tar.gz"
requires_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST files not found in {MNIST_DIR}",
)
requires_cifar_jpeg = pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"{CIFAR_JPEG} not found")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Keep the fallback cache (~/.cache/hssl) of every test inside its tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setattr(Path, "home", lambda: home)
    return home


@pytest.fixture
def decode_calls(monkeypatch):
    """Number of images each call of the imagefolder decoder received; no call means a cache hit."""
    calls: list[int] = []
    original = sources.decode_files

    def counting(paths, *args, **kwargs):
        calls.append(len(paths))
        return original(paths, *args, **kwargs)

    monkeypatch.setattr(sources, "decode_files", counting)
    return calls


def folder_config(root: Path, image_size: int = 16) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), image_size=image_size)


def random_image(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8, generator=generator)


def write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = encode_png(image) if path.suffix.lower() == ".png" else encode_jpeg(image, quality=95)
    path.write_bytes(encoded.numpy().tobytes())


@pytest.fixture
def tiny_tree(tmp_path) -> dict[str, torch.Tensor]:
    """train/{cat,dog} with PNG and JPEG files of several sizes and extension cases, plus test/."""
    root = tmp_path / "folder"
    images = {
        "train/cat/a.png": random_image(3, 16, 16, seed=0),
        "train/cat/b.JPG": random_image(3, 20, 24, seed=1),
        "train/cat/c.png": random_image(1, 16, 16, seed=2),  # grayscale
        "train/dog/d.jpeg": random_image(3, 16, 16, seed=3),
        "train/dog/e.PNG": random_image(3, 40, 40, seed=4),
        "test/cat/f.png": random_image(3, 16, 16, seed=5),
        "test/dog/g.png": random_image(3, 16, 16, seed=6),
    }
    for name, image in images.items():
        write_image(root / name, image)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return images


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes((0, 0, 8, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fake_mnist(root: Path, split_prefix: str, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split_prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / f"{split_prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return images, labels


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Each image with its label as bytes, sorted: equal lists mean equal multisets of samples."""
    flat = images.reshape(len(labels), -1)
    return sorted(row.tobytes() + bytes([int(label)]) for row, label in zip(flat, labels, strict=True))


# digits


def test_digits_splits_have_expected_sizes_dtype_and_value_range():
    config = DataConfig(dataset="digits", image_size=32)
    for split, size in (("train", 1437), ("test", 360)):
        data = load_split(config, split)
        assert data.images.shape == (size, 1, 32, 32)
        assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
        assert int(data.images.min()) == 0 and int(data.images.max()) == 255
        assert data.labels.dtype == torch.int64 and data.labels.shape == (size,)
        assert sorted(data.labels.unique().tolist()) == list(range(10))
        assert data.classes == [str(digit) for digit in range(10)]


def test_digits_split_is_a_deterministic_stratified_partition():
    from sklearn.datasets import load_digits

    config = DataConfig(dataset="digits", image_size=8)  # native size: pixels are the scaled originals
    train, test = load_split(config, "train"), load_split(config, "test")
    again = load_split(config, "test")
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)

    digits = load_digits()
    expected = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    # train and test together are exactly the whole set (as a multiset: the set has duplicate images)
    train_and_test = torch.cat([train.images, test.images]).numpy()
    together = sorted_rows(train_and_test, torch.cat([train.labels, test.labels]).numpy())
    assert together == sorted_rows(expected, digits.target)
    per_class_total = np.bincount(digits.target)
    per_class_test = np.bincount(test.labels.numpy(), minlength=10)
    assert np.all(np.abs(per_class_test - 0.2 * per_class_total) <= 1)


def test_unknown_split_lists_the_valid_ones():
    with pytest.raises(DataError, match="valid splits: train, test"):
        load_split(DataConfig(dataset="digits"), "validation")
    with pytest.raises(DataError, match="train, test, unlabeled, train\\+unlabeled"):
        load_split(DataConfig(dataset="stl10", root="/nonexistent"), "val")


def test_resize_keeps_uint8_and_constant_images_constant():
    constant = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    for size in (4, 8, 20):
        resized = resize_images(constant, size)
        assert resized.dtype == torch.uint8 and resized.shape == (2, 3, size, size)
        assert torch.all(resized == 100)


# mnist


@requires_mnist
def test_mnist_test_split_has_the_known_t10k_labels_and_shape():
    data = load_split(DataConfig(dataset="mnist", root=str(MNIST_DIR), image_size=32), "test")
    assert data.images.shape == (10000, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@requires_mnist
def test_mnist_at_native_size_returns_the_raw_idx_pixels():
    data = load_split(DataConfig(dataset="mnist", root=str(MNIST_DIR), image_size=28), "test")
    raw = gzip.decompress((MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, dtype=np.uint8, offset=16, count=2 * 784).reshape(2, 28, 28)
    assert np.array_equal(data.images[:2, 0].numpy(), first)


def test_mnist_reads_gzipped_and_plain_idx_files(tmp_path):
    images, labels = write_fake_mnist(tmp_path, "train")
    data = load_split(DataConfig(dataset="mnist", root=str(tmp_path), image_size=28), "train")
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"\x89PNG" + raw[4:], id="bad-magic"),
        pytest.param(lambda raw: raw[:3] + b"\x01" + raw[4:], id="wrong-dimensions"),
        pytest.param(lambda raw: b"", id="empty"),
    ],
)
def test_mnist_rejects_a_damaged_idx_file_naming_it(tmp_path, damage):
    write_fake_mnist(tmp_path, "t10k")
    images_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    images_file.write_bytes(gzip.compress(damage(gzip.decompress(images_file.read_bytes()))))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_split(DataConfig(dataset="mnist", root=str(tmp_path)), "test")


def test_mnist_rejects_a_corrupt_gzip_file_and_names_a_missing_one(tmp_path):
    write_fake_mnist(tmp_path, "t10k")
    labels_file = tmp_path / "t10k-labels-idx1-ubyte"
    labels_file.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: corrupt gzip"):
        load_split(DataConfig(dataset="mnist", root=str(tmp_path)), "test")
    labels_file.unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*not found"):
        load_split(DataConfig(dataset="mnist", root=str(tmp_path)), "test")


# imagefolder


def test_imagefolder_finds_classes_labels_and_pixels(tmp_path, tiny_tree):
    data = load_split(folder_config(tmp_path / "folder"), "train")
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]  # a.png b.JPG c.png | d.jpeg e.PNG; notes.txt ignored
    assert data.images.shape == (5, 3, 16, 16) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[0], tiny_tree["train/cat/a.png"])  # PNG is lossless, no resize
    assert torch.equal(data.images[2], tiny_tree["train/cat/c.png"].expand(3, 16, 16))  # gray -> RGB
    test = load_split(folder_config(tmp_path / "folder"), "test")
    assert test.labels.tolist() == [0, 1] and torch.equal(test.images[1], tiny_tree["test/dog/g.png"])


def test_imagefolder_second_load_reads_the_cache_without_decoding(tmp_path, tiny_tree, decode_calls):
    root = tmp_path / "folder"
    first = load_split(folder_config(root), "train", progress=progress_bars(True))
    cache_files = list((root / ".hssl-cache").iterdir())
    assert [path.suffix for path in cache_files] == [".safetensors"]  # and no temp file left behind
    second = load_split(folder_config(root), "train")
    assert decode_calls == [5]
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes and second.images.is_contiguous()


def test_imagefolder_cache_is_keyed_on_the_file_list_and_image_size(tmp_path, tiny_tree, decode_calls):
    root = tmp_path / "folder"
    load_split(folder_config(root), "train")
    write_image(root / "train" / "dog" / "z.png", random_image(3, 16, 16, seed=7))
    grown = load_split(folder_config(root), "train")
    assert grown.labels.tolist() == [0, 0, 0, 1, 1, 1]
    os.utime(root / "train" / "cat" / "a.png", ns=(1, 1))  # same name and size, new mtime
    load_split(folder_config(root), "train")
    load_split(folder_config(root, image_size=8), "train")
    load_split(folder_config(root, image_size=8), "train")
    assert decode_calls == [5, 6, 6, 6]
    # each rebuild replaced the cache it invalidated; the two image sizes keep one cache each
    assert sorted(path.name.split("-")[1] for path in (root / ".hssl-cache").iterdir()) == ["16px", "8px"]


def test_stale_caches_of_other_folders_in_the_shared_home_cache_are_kept(tmp_path, tiny_tree, home):
    shared = home / ".cache" / "hssl"
    roots = [tmp_path / "folder", tmp_path / "copy"]
    shutil.copytree(roots[0], roots[1])
    write_image(roots[1] / "train" / "dog" / "y.png", random_image(3, 16, 16, seed=6))
    for root in roots:
        (root / ".hssl-cache").write_text("in the way")  # both fall back to the shared home cache
        load_split(folder_config(root), "train")
    assert len(list(shared.iterdir())) == 2
    write_image(roots[1] / "train" / "dog" / "z.png", random_image(3, 16, 16, seed=7))
    load_split(folder_config(roots[1]), "train")
    sources = []
    for path in shared.iterdir():
        with safe_open(path, framework="pt") as handle:
            sources.append((handle.metadata()["source"], handle.get_tensor("labels").numel()))
    # the copy's old 6-image cache is gone, its new 7-image one is there, the other folder's is untouched
    assert sorted(sources) == sorted([(str(roots[0]), 5), (str(roots[1]), 7)])


def test_imagefolder_corrupt_cache_is_ignored_and_rebuilt(tmp_path, tiny_tree, decode_calls):
    root = tmp_path / "folder"
    first = load_split(folder_config(root), "train")
    (cache_file,) = (root / ".hssl-cache").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    rebuilt = load_split(folder_config(root), "train")
    load_split(folder_config(root), "train")
    assert decode_calls == [5, 5]
    assert torch.equal(first.images, rebuilt.images)


def test_imagefolder_falls_back_to_the_home_cache_when_root_is_not_writable(
    tmp_path, tiny_tree, home, decode_calls
):
    root = tmp_path / "folder"
    # A file where the cache folder would go blocks it even for root, who ignores permissions.
    (root / ".hssl-cache").write_text("in the way")
    root.chmod(0o555)
    try:
        first = load_split(folder_config(root), "train")
        second = load_split(folder_config(root), "train")
    finally:
        root.chmod(0o755)
    assert decode_calls == [5]
    assert [path.suffix for path in (home / ".cache" / "hssl").iterdir()] == [".safetensors"]
    assert torch.equal(first.images, second.images)


def test_imagefolder_still_loads_and_warns_when_no_cache_folder_is_writable(tmp_path, tiny_tree, home):
    root = tmp_path / "folder"
    (root / ".hssl-cache").write_text("in the way")
    home.mkdir()
    (home / ".cache").write_text("in the way too")
    with pytest.warns(UserWarning, match="could not cache the decoded images"):
        data = load_split(folder_config(root), "train")
    assert data.labels.tolist() == [0, 0, 0, 1, 1]


def make_missing_root(root: Path) -> None:
    """Leave the root folder absent."""


def make_empty_classes(root: Path) -> None:
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "readme.txt").write_text("no images here")


def make_no_class_folders(root: Path) -> None:
    (root / "train").mkdir(parents=True)  # images without class folders are an unlabeled split; nothing is not
    (root / "train" / "notes.txt").write_text("no images here")


def make_corrupt_jpeg(root: Path) -> None:
    write_image(root / "train" / "cat" / "good.jpg", random_image(3, 8, 8, seed=0))
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)


@pytest.mark.parametrize(
    ("make", "split", "message"),
    [
        (make_missing_root, "train", "no such folder; imagefolder expects"),
        (make_empty_classes, "train", "no .jpg/.jpeg/.png images in its class folders"),
        (make_empty_classes, "val", "valid splits here: train"),
        (make_no_class_folders, "train", "no class folders and no images"),
        (make_corrupt_jpeg, "train", "broken.jpg: cannot decode"),
    ],
    ids=["missing-root", "no-images", "unknown-split", "no-class-folders", "corrupt-image"],
)
def test_imagefolder_user_errors_name_the_path_and_layout(tmp_path, make, split, message):
    root = tmp_path / "folder"
    make(root)
    with pytest.raises(DataError, match=message) as error:
        load_split(folder_config(root), split)
    assert str(root) in str(error.value)


@pytest.fixture(scope="module")
def cifar_jpeg_subset(tmp_path_factory) -> Path:
    """airplane and automobile 0000..0049 of cifar10-jpeg's train split, extracted to a temp folder."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} not found")
    classes, per_class = ("airplane", "automobile"), 50
    wanted = {f"cifar10-jpeg/train/{name}/{index:04d}.jpg" for name in classes for index in range(per_class)}
    target = tmp_path_factory.mktemp("cifar10-jpeg-subset")
    # Decompress once into memory: extracting from a gzip stream would decompress it again to seek.
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(CIFAR_JPEG.read_bytes()))) as archive:
        members = []
        for member in archive:
            if member.name in wanted:
                members.append(member)
                if len(members) == len(wanted):
                    break
        archive.extractall(target, members=members, filter="data")
    return target / "cifar10-jpeg"


@requires_cifar_jpeg
def test_imagefolder_on_a_real_cifar10_jpeg_subset(cifar_jpeg_subset):
    data = load_split(folder_config(cifar_jpeg_subset, image_size=32), "train")
    assert data.images.shape == (100, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == ["airplane", "automobile"]
    assert data.labels.tolist() == [0] * 50 + [1] * 50
    encoded = (cifar_jpeg_subset / "train" / "automobile" / "0007.jpg").read_bytes()
    direct = decode_jpeg(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    assert torch.equal(data.images[57], direct)
    smaller = load_split(folder_config(cifar_jpeg_subset, image_size=16), "train")
    assert smaller.images.shape == (100, 3, 16, 16)


# cifar10, stl10


@pytest.mark.parametrize("root_name", ["data", "data/cifar-10-batches-py"])
def test_cifar10_missing_files_name_the_expected_batches_folder(tmp_path, root_name):
    config = DataConfig(dataset="cifar10", root=str(tmp_path / root_name))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as error:
        load_split(config, "train")
    assert str(tmp_path / "data" / "cifar-10-batches-py") in str(error.value)


def test_stl10_missing_files_name_the_expected_binary_folder(tmp_path):
    with pytest.raises(DataError) as error:
        load_split(DataConfig(dataset="stl10", root=str(tmp_path)), "unlabeled")
    assert str(tmp_path / "stl10_binary") in str(error.value)


def test_datasets_on_disk_require_a_root():
    with pytest.raises(DataError, match="data.root is required for dataset 'mnist'"):
        load_split(DataConfig(dataset="mnist"), "train")
