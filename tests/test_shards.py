"""`hssl shards` and ShardReader: a packed folder reads back the in-memory loader's images bit for bit
(PNG), pre-resized shards equal the loader's resizing, a truncated shard is named with its sample (stop) or
its samples left out (skip), an unfinished pack is refused, and nothing already written is overwritten."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.shards import MANIFEST, ShardReader, pack_folder
from hssl_cli.data.sources import load_split
from hssl_cli.errors import DataError
from hssl_cli.recipe import DataConfig


def _folder(tmp_path, sizes=(12, 12, 12, 16, 12)):
    """train/{a,b}/ and test/{a,b}/ of PNGs (one of another size), a stray text file in one class."""
    from torchvision.io import write_png

    generator = torch.Generator().manual_seed(0)
    root = tmp_path / "images"
    for split, count in (("train", 5), ("test", 2)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                side = sizes[index % len(sizes)]
                image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
                write_png(image, str(folder / f"{index:03d}.png"))
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    return root


def test_shards_read_back_the_in_memory_images_bit_for_bit(tmp_path):
    root = _folder(tmp_path)
    manifest = pack_folder(root, tmp_path / "shards", per_shard=4)
    assert [shard["count"] for shard in manifest["splits"]["train"]["shards"]] == [4, 4, 2]
    assert json.loads((tmp_path / "shards" / MANIFEST).read_text()) == manifest
    memory = load_split(DataConfig(dataset="imagefolder", root=str(root), image_size=12), "train")
    reader = ShardReader(tmp_path / "shards", "train")
    assert len(reader) == 10 and reader.classes == ["a", "b"] and torch.equal(reader.labels, memory.labels)
    assert reader.read(0) == (root / "train" / "a" / "000.png").read_bytes()
    order = [7, 0, 3, 9, 4]  # any order: a permutation, a rank's share
    assert torch.equal(reader.images(order, 12), memory.images[order])


def test_pre_resized_shards_equal_the_loaders_resizing(tmp_path):
    root = _folder(tmp_path)
    pack_folder(root, tmp_path / "shards", splits=["train"], size=8)
    reader = ShardReader(tmp_path / "shards", "train")
    assert reader.name(3).endswith("00000003.png")
    memory = load_split(DataConfig(dataset="imagefolder", root=str(root), image_size=8), "train")
    assert torch.equal(reader.images(list(range(10)), 8), memory.images)
    with pytest.raises(DataError, match="no split 'test'"):
        ShardReader(tmp_path / "shards", "test")


def test_a_truncated_shard_is_named_with_its_sample_or_skipped(tmp_path):
    root = _folder(tmp_path)
    pack_folder(root, tmp_path / "shards", splits=["train"], per_shard=4)
    shard = tmp_path / "shards" / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # samples 4..7: the second half is gone
    with pytest.raises(DataError, match=r"train-000001.tar: shard truncated or incomplete, sample \d+ "):
        ShardReader(tmp_path / "shards", "train")
    with pytest.warns(UserWarning, match="skipped"):
        reader = ShardReader(tmp_path / "shards", "train", on_corrupt="skip")
    assert 6 <= len(reader) < 10 and reader.skipped == ["00000007"] and len(reader) + len(reader.skipped) == 10
    assert reader.images(list(range(len(reader))), 12).shape == (len(reader), 3, 12, 12)
    shard.write_bytes(data)
    (tmp_path / "shards" / "train-000002.tar").unlink()
    with pytest.raises(DataError, match="train-000002.tar: shard missing"):
        ShardReader(tmp_path / "shards", "train")


def test_an_unfinished_or_foreign_pack_is_refused_and_a_pack_is_never_overwritten(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(DataError, match="no manifest.json: not a shard folder, or an unfinished pack"):
        ShardReader(root, "train")
    pack_folder(root, tmp_path / "shards", splits=["test"])
    before = (tmp_path / "shards" / MANIFEST).read_text()
    with pytest.raises(DataError, match="already holds shards"):
        pack_folder(root, tmp_path / "shards")
    assert (tmp_path / "shards" / MANIFEST).read_text() == before
    (tmp_path / "shards" / MANIFEST).write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a readable shard manifest"):
        ShardReader(tmp_path / "shards", "test")


def test_a_folder_of_images_is_one_unlabeled_split(tmp_path):
    root = _folder(tmp_path)
    flat = root / "train" / "a"
    manifest = pack_folder(flat, tmp_path / "shards")
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["classes"] == []
    reader = ShardReader(tmp_path / "shards", "train")
    assert len(reader) == 5 and (reader.labels == -1).all()


def test_the_cli_packs_with_a_summary_and_refuses_bad_input_in_one_line(tmp_path):
    root = _folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["shards", str(root), str(tmp_path / "shards"), "--per-shard", "3"])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "wrote" in result.output and "manifest.json" in result.output
    missing = runner.invoke(app, ["shards", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert missing.exit_code != 0 and "no such folder" in missing.output and "Traceback" not in missing.output
    unknown = runner.invoke(app, ["shards", str(root), str(tmp_path / "out2"), "--split", "val"])
    assert unknown.exit_code != 0 and "no such split; this folder has test, train" in unknown.output
