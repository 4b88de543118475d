"""data.storage: stream: the training split kept encoded and decoded batch by batch gives an in-memory run's
weights bit for bit (PNG and, with the CPU decoder both use, JPEG; image files and shards), resumes
mid-epoch bit-exact, reads disjoint per-rank shares, and names (or skips) an image it cannot decode."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.data import stream
from hssl_cli.data.image_files import decode_at_size
from hssl_cli.data.shards import pack_folder
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import DataError, HsslError
from hssl_cli.recipe import parse_recipe
from tests.conftest import train_stopped_and_resumed

RECIPE = """
name: streamed
seed: 1
data: {{dataset: {dataset}, root: {root}, image_size: 16, storage: {storage}, workers: {workers}}}
augment: {{crop_scale: [0.5, 1.0], color_jitter: {{p: 0.5}}, blur: {{p: 0.0}}}}
model: {{backbone: small_convnet, projector: [32, 16]}}
method: {{name: simclr, temperature: 0.5}}
optim: {{name: adamw, lr: 1.0e-3, warmup_epochs: 0}}
train: {{epochs: 2, batch_size: 16, checkpoint_every: 1, log_every: 2}}
"""


def _folder(tmp_path, suffix: str = "png", count: int = 24):
    from torchvision.io import encode_jpeg, write_png

    generator = torch.Generator().manual_seed(0)
    root = tmp_path / f"images-{suffix}"
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count // 2):
                side = 20 if index == 3 else 16  # one image of another size: resized on the way
                image = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=generator)
                path = folder / f"{index:03d}.{suffix}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    if suffix == "png":
                        write_png(image, str(path))
                    else:
                        path.write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
    return root


def _recipe(root, storage="memory", dataset="imagefolder", workers=2, extra=()):
    text = RECIPE.format(dataset=dataset, root=root, storage=storage, workers=workers)
    return parse_recipe(text, "streamed.yaml", list(extra))


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run.checkpoint)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_a_streamed_run_equals_an_in_memory_run_bit_for_bit(tmp_path, suffix):
    root = _folder(tmp_path, suffix)
    memory = pretrain(_recipe(root), tmp_path / "memory", device_name="cpu")
    streamed = pretrain(_recipe(root, "stream"), tmp_path / "stream", device_name="cpu")
    expected, got = _weights(memory), _weights(streamed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    first_row = (streamed.run_dir / "metrics.jsonl").read_text().splitlines()[0]
    assert '"data_storage": "stream"' in first_row


def test_shards_stream_like_their_folder_and_a_subset_is_the_same_choice(tmp_path):
    root = _folder(tmp_path)
    pack_folder(root, tmp_path / "shards", per_shard=7)
    subset = ["data.subset=20"]
    memory = pretrain(_recipe(root, extra=subset), tmp_path / "memory", device_name="cpu")
    for storage in ("stream", "memory"):
        run = pretrain(_recipe(tmp_path / "shards", storage, "shards", workers=0, extra=subset),
                       tmp_path / f"shards-{storage}", device_name="cpu")
        expected, got = _weights(memory), _weights(run)
        assert all(torch.equal(expected[key], got[key]) for key in expected), storage


def test_a_killed_streamed_run_resumes_mid_epoch_bit_exact(tmp_path):
    root = _folder(tmp_path)
    recipe = _recipe(root, "stream", extra=["train.batch_size=8"])  # 3 steps per epoch
    whole, stopped, resumed = train_stopped_and_resumed(recipe, tmp_path, stop_step=2)
    assert stopped.interrupted and stopped.steps % 3 != 0 and resumed.steps == whole.steps == 6  # mid-epoch
    expected, got = _weights(whole), _weights(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_ranks_read_disjoint_shares_of_each_step(tmp_path, monkeypatch):
    root = _folder(tmp_path, count=32)
    images, _ = stream.training_images(_recipe(root, "stream", workers=0).data, 0, torch.device("cpu"))
    monkeypatch.setattr(stream.EncodedImages, "decode",
                        lambda self, item: torch.full((3, 2, 2), item, dtype=torch.uint8))
    permutation = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    shares = [list(images.epoch_batches(permutation, 1, 8, 4, rank)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 3  # steps 1, 2, 3 of the epoch (a resume at step 1)
    for step, (first, second) in enumerate(zip(*shares, strict=True), start=1):
        read = first[:, 0, 0, 0].tolist() + second[:, 0, 0, 0].tolist()
        assert read == permutation[8 * step:8 * step + 8].tolist()  # rank 0 the first half, rank 1 the second
        assert not set(first[:, 0, 0, 0].tolist()) & set(second[:, 0, 0, 0].tolist())


def test_auto_streams_what_does_not_fit_and_stream_refuses_other_datasets(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    config = _recipe(root, "auto").data
    images, why = stream.training_images(config, 0, torch.device("cpu"))
    assert images.storage == "memory" and "auto -> memory" in why
    monkeypatch.setattr(stream, "device_memory_bytes", lambda device: 1000)
    images, why = stream.training_images(config, 0, torch.device("cpu"))
    assert images.storage == "stream" and "auto -> stream" in why and "GiB" in why
    with pytest.raises(HsslError, match="data.storage: stream reads image folders and shards"):
        stream.training_images(parse_recipe("data: {dataset: digits, storage: stream}\n", "x.yaml").data, 0,
                               torch.device("cpu"))


def test_an_image_that_cannot_be_decoded_stops_the_run_naming_it_or_is_skipped(tmp_path):
    root = _folder(tmp_path)
    broken = root / "train" / "b" / "005.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    recipe = _recipe(root, "stream", workers=0, extra=["data.storage=stream"])
    with pytest.raises(DataError, match="005.png: cannot decode"):
        pretrain(recipe, tmp_path / "stop", device_name="cpu")
    skipping = _recipe(root, "stream", workers=0, extra=["data.on_corrupt=skip"])
    with pytest.warns(UserWarning, match="replaced by the next image"):
        run = pretrain(skipping, tmp_path / "skip", device_name="cpu")
    assert run.steps == 2 * (24 // 16)


def test_streamed_statistics_are_cached_per_source_and_choice(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    config = _recipe(root, "stream", workers=0).data
    images, _ = stream.training_images(config, 0, torch.device("cpu"))
    first = images.channel_stats()
    calls = []
    monkeypatch.setattr(stream.StreamedImages, "_streamed_stats", lambda self, progress: calls.append(1))
    again, _ = stream.training_images(config, 0, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(again.channel_stats(), first, strict=True)) and not calls
    subset = config.model_copy(update={"subset": 10})
    other, _ = stream.training_images(subset, 0, torch.device("cpu"))
    with pytest.raises(TypeError):  # another choice of images: not the cached file, so the pass runs
        other.channel_stats()
    assert calls


def test_the_training_process_decodes_read_bytes_like_the_workers(tmp_path):
    """The CUDA path (workers read bytes, the training process decodes in one batched call), run on the CPU:
    the same images as the workers' decoding; a corrupt image is named."""
    root = _folder(tmp_path, "jpg")
    images, _ = stream.training_images(_recipe(root, "stream", workers=0).data, 0, torch.device("cpu"))
    indices = [5, 0, 3, 17]
    names = [images.dataset.source.name(i) for i in indices]
    data = [images.dataset.source.read(i) for i in indices]
    expected = torch.stack([images.dataset[i] for i in indices])
    assert torch.equal(decode_at_size(names, data, 16, torch.device("cpu")), expected)
    with pytest.raises(DataError, match="broken.jpg: cannot decode"):
        decode_at_size([*names, "broken.jpg"], [*data, b"\xff\xd8\xff" + b"\x00" * 30], 16, torch.device("cpu"))


def test_a_streamed_probe_split_holds_the_in_memory_splits_classes_labels_and_pixels(tmp_path):
    from hssl_cli.evaluate.probe_data import LazyImages, probe_split

    config = _recipe(_folder(tmp_path, count=8), "stream", workers=0).data
    streamed = probe_split(config, "test", torch.device("cpu"))
    in_memory = probe_split(config.model_copy(update={"storage": "memory"}), "test", torch.device("cpu"))
    assert isinstance(streamed.images, LazyImages) and isinstance(in_memory.images, torch.Tensor)
    assert streamed.classes == in_memory.classes == ["a", "b"]
    assert torch.equal(streamed.labels, in_memory.labels)
    assert torch.equal(streamed.images.to("cpu"), in_memory.images)
    assert torch.equal(torch.cat(list(streamed.images[2:7].batches(2))), in_memory.images[2:7])


def test_a_streamed_probe_scores_what_the_in_memory_probe_scores(tmp_path):
    from hssl_cli.evaluate.commands.probe import probe_checkpoint
    from hssl_cli.evaluate.measures.finetune_protocol import FinetuneProtocol

    root = _folder(tmp_path, count=40)
    memory = pretrain(_recipe(root, extra=["train.epochs=1"]), tmp_path / "memory", device_name="cpu")
    streamed = pretrain(_recipe(root, "stream", extra=["train.epochs=1"]), tmp_path / "stream", device_name="cpu")
    expected = probe_checkpoint(memory.checkpoint, device_name="cpu", progress=False, cache=False)
    got = probe_checkpoint(streamed.checkpoint, device_name="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert got["results"] == expected["results"] and got["train_size"] == 40
    again = probe_checkpoint(streamed.checkpoint, device_name="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert again["feature_cache"]["hits"] == 2 and again["results"] == expected["results"]
    with pytest.raises(HsslError, match="this split is streamed"):
        probe_checkpoint(streamed.checkpoint, device_name="cpu", progress=False, protocol="standard")
    # fine-tuning reads streamed batches: the same steps on the same images as in memory
    tuned = {storage: probe_checkpoint(run.checkpoint, device_name="cpu", progress=False, protocol="finetune",
                                       finetune=FinetuneProtocol(epochs=2, batch_size=16))["results"]
             for storage, run in (("memory", memory), ("stream", streamed))}
    assert tuned["stream"] == tuned["memory"]
    with pytest.raises(HsslError, match="this split is streamed"):
        probe_checkpoint(streamed.checkpoint, device_name="cpu", progress=False, exact_kernel_knn=True)


def test_the_imagenet_recipes_stream_their_shards_with_views_smaller_than_the_working_size(tmp_path):
    """byol_equimod_imagenet.yaml as written (shards, stream, 224-px global views cut from 256-px images),
    shrunk to a tiny folder: working size 24, views 16, the small ConvNet."""
    from hssl_cli.recipe import load_recipe
    from tests.test_directpred import RECIPES

    root = _folder(tmp_path)
    pack_folder(root, tmp_path / "shards", size=24)
    recipe = load_recipe(RECIPES / "byol_equimod_imagenet.yaml", [
        f"data.root={tmp_path / 'shards'}", "data.image_size=24", "data.test_split=test", "data.workers=0",
        "views=[{size: 16, role: global, blur: {p: 1.0}}, {size: 16, role: global, solarize: 0.2}]",
        "model.backbone=small_convnet", "model.projector=[32, 16]",
        "method.predictor=[32, 16]", "method.equimod.projector=[16, 8]", "method.equimod.param_embedding=8",
        "train.batch_size=8", "train.epochs=1", "optim.warmup_epochs=0", "train.compile=false"])
    assert recipe.data.storage == "stream" and recipe.resolved_views()[0].size == 16
    run = pretrain(recipe, tmp_path / "runs", device_name="cpu")
    assert run.steps == 3 and '"data_storage": "stream"' in (run.run_dir / "metrics.jsonl").read_text()


def test_a_split_of_images_without_class_folders_is_an_unlabeled_pretraining_source(tmp_path):
    from hssl_cli.data.sources import load_split
    from hssl_cli.recipe import DataConfig

    root = _folder(tmp_path)
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    for image in sorted((root / "train").glob("*/*.png")):
        (flat / f"{image.parent.name}-{image.name}").write_bytes(image.read_bytes())
    split = load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "flat"), image_size=16), "train")
    assert len(split.labels) == 24 and (split.labels == -1).all() and split.classes == []
    memory = pretrain(_recipe(tmp_path / "flat", extra=["train.epochs=1"]), tmp_path / "m", device_name="cpu")
    streamed = pretrain(_recipe(tmp_path / "flat", "stream", extra=["train.epochs=1"]), tmp_path / "s",
                        device_name="cpu")
    assert all(torch.equal(a, b) for a, b in zip(_weights(memory).values(), _weights(streamed).values(), strict=True))


def test_a_sigterm_to_the_whole_job_stops_a_streamed_run_cleanly(tmp_path):
    """SLURM and `timeout` signal every process of the job, the DataLoader workers too: the run stops at a
    step with its checkpoint written and exits with 143 (pre-empted: resume it), not with a worker's crash."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = _folder(tmp_path, count=64)
    recipe = tmp_path / "streamed.yaml"
    recipe.write_text(RECIPE.format(dataset="imagefolder", root=root, storage="stream", workers=2)
                      .replace("epochs: 2, batch_size: 16", "epochs: 400, batch_size: 16"))
    process = subprocess.Popen([sys.executable, "-m", "hssl_cli", "pretrain", str(recipe), "--output",
                                str(tmp_path / "runs"), "--device", "cpu"], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "runs").glob("*/*/last.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's checkpoint: the workers are running
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "interrupted" in output and "DataLoader worker" not in output and "error" not in output
    from hssl_cli.engine.checkpoint import load_checkpoint

    state = load_checkpoint(next((tmp_path / "runs").glob("*/*/last.state.safetensors")), kind="training_state")
    assert state.step >= 4  # at least the first epoch (4 steps), which had ended before the signal
