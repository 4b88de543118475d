"""Transfer evaluation: CIFAR-100 (fine and coarse labels) read from the official python version, and suites
that probe each cell's checkpoint on other datasets (`transfer:`), on tiny data the tests make."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.sources import load_split
from hssl_cli.errors import DataError, HsslError, RecipeError
from hssl_cli.recipe import DataConfig
from hssl_cli.sweep.run import cell_folder, read_result
from hssl_cli.sweep.suite import load_suite

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
runner = CliRunner()

FINE_NAMES = [f"fine_{number:02d}" for number in range(100)]
COARSE_NAMES = [f"coarse_{number:02d}" for number in range(20)]
PER_CLASS = {"train": 6, "test": 1}  # 6: the fast probe holds out round(10%) of each class to choose its weight decay


def write_fake_cifar100(root: Path, keys_as_bytes: bool = False) -> dict[str, dict]:
    """root/cifar-100-python/{train, test, meta} laid out as the official python version: pickled dicts of
    uint8 rows (N, 3072) = R, G, B planes of 32x32, fine_labels, coarse_labels (here fine // 5) and filenames.
    The official files are Python 2 pickles, whose keys read as text; `keys_as_bytes`: keys written as bytes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, count in PER_CLASS.items():
        fine = rng.permutation(np.tile(np.arange(100), count))
        written[split] = {"batch_label": f"{split} batch", "filenames": [f"{split}_{i}.png" for i in range(len(fine))],
                          "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                          "data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)}
    written["meta"] = {"fine_label_names": FINE_NAMES, "coarse_label_names": COARSE_NAMES}
    for name, entry in written.items():
        stored = {key.encode() if keys_as_bytes else key: value for key, value in entry.items()}
        (folder / name).write_bytes(pickle.dumps(stored, protocol=2))
    return written


def cifar100(root: Path, dataset: str = "cifar100", image_size: int = 32) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), image_size=image_size)


@pytest.mark.parametrize("keys_as_bytes", [False, True])
def test_cifar100_fine_and_coarse_labels_of_the_same_images(tmp_path, keys_as_bytes):
    written = write_fake_cifar100(tmp_path, keys_as_bytes)
    for split in ("train", "test"):
        fine, coarse = (load_split(cifar100(tmp_path, dataset), split) for dataset in ("cifar100", "cifar100_coarse"))
        assert fine.labels.tolist() == written[split]["fine_labels"] and fine.classes == FINE_NAMES
        assert coarse.labels.tolist() == written[split]["coarse_labels"] and coarse.classes == COARSE_NAMES
        assert torch.equal(fine.images, coarse.images) and fine.labels.dtype == torch.int64
        assert fine.images.shape == (100 * PER_CLASS[split], 3, 32, 32) and fine.images.dtype == torch.uint8
        rows = written[split]["data"]
        assert fine.images[5, 0].flatten().tolist() == rows[5, :1024].tolist()  # the red plane comes first
        assert fine.images[5, 2].flatten().tolist() == rows[5, 2048:].tolist()
        assert fine.images[7, 1, 3, 4] == rows[7, 1024 + 3 * 32 + 4]  # row-major within a plane


def test_cifar100_reads_as_torchvisions_reader_does(tmp_path, monkeypatch):
    """torchvision's CIFAR100 refuses the fake files by their md5 sums; its check set aside, it reads the same
    images, fine labels and class names."""
    import torchvision.datasets.cifar as torchvision_cifar

    write_fake_cifar100(tmp_path)
    monkeypatch.setattr(torchvision_cifar, "check_integrity", lambda *args, **kwargs: True)
    for split in ("train", "test"):
        reference = torchvision_cifar.CIFAR100(str(tmp_path), train=split == "train", download=False)
        ours = load_split(cifar100(tmp_path / "cifar-100-python"), split)  # data.root may name the folder itself
        assert torch.equal(ours.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == reference.targets and ours.classes == reference.classes


def test_cifar100_resizes_to_the_recipes_image_size(tmp_path):
    write_fake_cifar100(tmp_path)
    assert load_split(cifar100(tmp_path, "cifar100_coarse", image_size=16), "test").images.shape == (100, 3, 16, 16)


def test_missing_cifar100_says_where_to_extract_the_archive(tmp_path):
    with pytest.raises(DataError, match="extract the official cifar-100-python.tar.gz into") as error:
        load_split(cifar100(tmp_path / "data"), "train")
    assert str(tmp_path / "data" / "cifar-100-python") in str(error.value)
    with pytest.raises(DataError, match="unknown split 'val' for dataset 'cifar100_coarse'; valid splits: train, test"):
        load_split(cifar100(tmp_path, "cifar100_coarse"), "val")


@pytest.mark.parametrize(("damage", "message"), [
    (lambda folder: (folder / "meta").unlink(), "meta: no such file"),
    (lambda folder: (folder / "train").write_bytes((folder / "train").read_bytes()[:200]), "not a readable CIFAR-100"),
    (lambda folder: (folder / "train").write_bytes(pickle.dumps([1, 2])), "holds a list"),
    (lambda folder: (folder / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.float32)})),
     "'data' is not uint8 rows of 3072 bytes"),
    (lambda folder: (folder / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)})),
     "no 'fine_labels' for each of its 2 images"),
    (lambda folder: (folder / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8),
                                                                 "fine_labels": [0, 100]})), "outside 0..99"),
])
def test_a_damaged_cifar100_file_is_a_one_line_error_naming_it(tmp_path, damage, message):
    write_fake_cifar100(tmp_path)
    damage(tmp_path / "cifar-100-python")
    with pytest.raises(DataError, match=message) as error:
        load_split(cifar100(tmp_path), "train")
    assert str(tmp_path / "cifar-100-python") in str(error.value) and "\n" not in str(error.value)


# transfer suites

RECIPE = """
name: tiny_folder
seed: 0
data: {{dataset: imagefolder, root: {root}, image_size: 16}}
augment: {{crop_scale: [0.5, 1.0], grayscale: 0.0}}
model: {{backbone: small_convnet, projector: [32, 16]}}
method: {{name: simclr, temperature: 0.5}}
optim: {{name: adamw, lr: 2.0e-3, warmup_epochs: 0}}
train: {{epochs: 1, batch_size: 8, log_every: 1, diagnostics_every: 0}}
"""

SUITE = """
name: tiny_transfer
seeds: [0]
variants: [{{name: simclr, recipe: recipe.yaml}}]
probe: {{train_samples: 10}}
transfer:
  - {{dataset: cifar100, data_root: {cifar}}}
  - {{dataset: cifar100_coarse, data_root: {cifar}, train_samples: 300, test_samples: 50}}
  - {{name: folder_standard, dataset: imagefolder, protocol: standard, epochs: 1, batch_size: 8}}
  - {{name: cifar100_finetune, dataset: cifar100, data_root: {cifar}, protocol: finetune, labels: 50%, epochs: 1,
     batch_size: 64}}
report:
  metrics: [linear, transfer/cifar100/linear, transfer/cifar100_coarse/knn_k20, transfer/folder_standard/linear]
"""


def write_tiny_image_folder(root: Path) -> None:
    """root/{train,test}/{a,b}/*.png: 32x32 colour images, a CIFAR-10-JPEG-shaped tree in miniature."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("test", 6)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for number in range(count):
                image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
                (root / split / label / f"{number}.png").write_bytes(encode_png(image).numpy().tobytes())


@pytest.fixture
def transfer_suite(tmp_path) -> Path:
    write_tiny_image_folder(tmp_path / "folder")
    write_fake_cifar100(tmp_path / "cifar")
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(root=tmp_path / "folder"))
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(cifar=tmp_path / "cifar"))
    return path


def _sweep(*arguments):
    return runner.invoke(app, ["sweep", *map(str, arguments), "--device", "cpu"])


def test_a_transfer_suite_probes_each_checkpoint_on_other_datasets(transfer_suite, tmp_path):
    output = tmp_path / "out"
    ran = _sweep(transfer_suite, "--output", output)
    assert ran.exit_code == 0, ran.output
    loaded = load_suite(transfer_suite)
    result = json.loads((cell_folder(output, loaded, loaded.cells[0]) / "result.json").read_text())
    transfer = result["transfer"]
    assert list(transfer) == ["cifar100", "cifar100_coarse", "folder_standard", "cifar100_finetune"]
    assert [transfer[key]["dataset"] for key in transfer] == ["cifar100", "cifar100_coarse", "imagefolder", "cifar100"]
    tuned = transfer["cifar100_finetune"]
    assert (tuned["protocol"], tuned["labels"], tuned["train_size"], list(tuned["results"])) == (
        "finetune", "50%", 300, ["finetune"])
    assert "1 epochs, batch 64, head lr 0.05 x batch/256" in tuned["results"]["finetune"]["detail"]
    assert (transfer["cifar100"]["train_size"], transfer["cifar100"]["test_size"]) == (600, 100)
    assert (transfer["cifar100_coarse"]["train_size"], transfer["cifar100_coarse"]["test_size"]) == (300, 50)
    assert transfer["folder_standard"]["protocol"] == "standard" and transfer["folder_standard"]["test_size"] == 12
    assert result["probe"]["dataset"] == "imagefolder" and result["probe"]["train_size"] == 10
    for key, probe in transfer.items():
        assert {f"transfer/{key}/{name}": value["top1"] for name, value in probe["results"].items()}.items() <= \
            result["metrics"].items()

    report = json.loads(_sweep(transfer_suite, "--output", output, "--report", "--json").stdout)
    metrics = report["groups"][0]["metrics"]
    assert metrics["transfer/cifar100/linear"]["values"] == [transfer["cifar100"]["results"]["linear"]["top1"]]
    assert metrics["transfer/cifar100_coarse/knn_k20"]["n"] == metrics["transfer/folder_standard/linear"]["n"] == 1
    assert "Transfer probes: transfer/cifar100/* = cifar100" in report["protocol"]
    assert "transfer/folder_standard/* = imagefolder, backbone features, linear = the papers' SGD" in report["protocol"]
    assert "(finetune = the backbone and a zero-initialised linear head trained end to end" in report["protocol"]
    assert "all train (50% of each class's labels)" in report["protocol"]
    markdown = (output / "tiny_transfer" / "report.md").read_text()
    assert "| variant | n | linear | transfer/cifar100/linear |" in markdown
    assert "finished earlier; skipped" in _sweep(transfer_suite, "--output", output).output

    # the same checkpoint, probed by hand on the coarse labels, scores as the suite's transfer probe did
    probed = runner.invoke(app, ["probe", result["checkpoint"], "--dataset", "cifar100_coarse", "--data-root",
                                 str(tmp_path / "cifar"), "--train-samples", "300", "--test-samples", "50",
                                 "--device", "cpu", "--json", "--no-cache"])
    assert probed.exit_code == 0, probed.output
    assert json.loads(probed.stdout)["results"] == transfer["cifar100_coarse"]["results"]


def test_finished_transfer_cells_match_while_their_settings_do(transfer_suite, tmp_path):
    output = tmp_path / "out"
    assert _sweep(transfer_suite, "--output", output).exit_code == 0
    loaded = load_suite(transfer_suite)
    path = cell_folder(output, loaded, loaded.cells[0]) / "result.json"
    stored = json.loads(path.read_text())
    # a transfer probe stored without a key added since (here weight_decay) still matches at today's default
    del stored["evaluation"]["transfer"][0]["weight_decay"]
    path.write_text(json.dumps(stored))
    assert read_result(path.parent, loaded, loaded.cells[0]) is not None
    # a suite that probes one dataset more refuses the cell rather than mixing results
    text = transfer_suite.read_text()
    transfer_suite.write_text(text.replace("report:", f"  - {{dataset: cifar100, name: more, data_root: {tmp_path}}}"
                                                      "\nreport:"))
    with pytest.raises(HsslError, match="probe/transfer/"):
        read_result(path.parent, load_suite(transfer_suite), loaded.cells[0])
    # and so does the suite with its transfer: removed (a suite without the key matches cells made without it)
    transfer_suite.write_text(text[:text.index("transfer:")] + text[text.index("report:"):])
    with pytest.raises(HsslError, match="probe/transfer/"):
        read_result(path.parent, load_suite(transfer_suite), loaded.cells[0])


@pytest.mark.parametrize(("transfer", "message"), [
    ("[{dataset: cifar100}]", "suite.yaml:6: transfer 'cifar100' needs data_root, the folder of its cifar100 files"),
    ("[{dataset: cifar100, data_root: a}, {dataset: cifar100, data_root: b}]",
     "transfer: two probes are named 'cifar100'; give each its own name"),
    ("[{dataset: cifar1000, data_root: a}]", "transfer.0.dataset"),
    ("[{dataset: stl10, data_root: a, protocol: slow}]", "transfer.0.protocol"),
    ("[{data_root: a}]", "transfer.0.dataset"),
])
def test_bad_transfer_probes_are_refused_before_any_cell_runs(transfer_suite, transfer, message):
    text = transfer_suite.read_text()
    transfer_suite.write_text(text[:text.index("transfer:")] + f"transfer: {transfer}\n" + text[text.index("report:"):])
    with pytest.raises(RecipeError) as error:
        load_suite(transfer_suite)
    assert message in str(error.value) and "\n" not in str(error.value)
