"""The hostile and careless inputs a fuzzing found, one named regression test each: every one is a
clear HsslError (one line naming the file or key), never a traceback, a hang or a silent surprise."""

import json
import os
import re
import signal
import struct
import time

import pytest
import torch
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import CheckpointError, HsslError, RecipeError
from hssl_cli.methods import build_method
from hssl_cli.recipe import load_recipe, parse_recipe

BASE = "name: x\n"


@pytest.mark.parametrize("text, message", [
    (BASE + "seed: 1000000000000000000000000000000\n", "seed: Input should be less than or equal to"),
    (BASE + "optim: {lr: 1.0e+30}\n", "optim.lr: Input should be less than or equal to 100"),
    (BASE + "optim: {warmup_epochs: .inf}\n", "optim.warmup_epochs: Input should be a finite number"),
    (BASE + "method: {name: simclr, temperature: .inf}\n", "temperature: Input should be a finite"),
    ("name: " + "n" * 300 + "\n", "name: String should have at most 100 characters"),
    (BASE + "model: {projector: [1e14]}\n", "model.projector.0: Input should be a valid integer"),
    (BASE + "model: {projector: [100000000000000]}\n", "model.projector.0: Input should be less than or equal to"),
    (BASE + "model: {projector: [60000, 60000, 60000]}\n", "model.projector: layers of widths .* GiB of weights"),
    (BASE + "train: {epochs: 1e22}\n", "train.epochs: Input should be a valid integer"),
    (BASE + "augment: {color_jitter: {brightness: 1e21}}\n", "augment.color_jitter.brightness: Input should be less"),
    (BASE + "optim: {betas: [2, 3]}\n", r"optim.betas: betas must both lie in \[0, 1\)"),
    (BASE + "train: {batch_size: 1:30}\n", "train.batch_size: Input should be a valid integer"),
    (BASE + "data: {image_size: 0x10}\n", "data.image_size: Input should be a valid integer"),
    (BASE + "train: {epochs: true}\n", "train.epochs: Input should be a valid integer"),
    (BASE + "seed: 1\nseed: 2\n", r"x.yaml:3: refused: duplicate key 'seed' \(first on line 2\)"),
    (BASE + "a: &a [1, 2]\nb: *a\n", r"x.yaml:3: refused: aliases \(\*a\) are not allowed"),
    (BASE + "x: " + "[" * 1000 + "]" * 1000 + "\n", "nested deeper than 32 levels"),
    ("", "an empty recipe"), ("# only a comment\n", "an empty recipe"), ("~\n", "an empty recipe"),
])  # fmt: skip
def test_a_recipe_the_engine_cannot_run_is_refused_naming_the_key(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "x.yaml")


def test_alias_expansion_is_refused_at_once():
    laughs = "name: x\na: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9))
    started = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases"):
        parse_recipe(laughs, "x.yaml")
    assert time.perf_counter() - started < 1


def test_a_recipe_file_without_a_name_is_refused(tmp_path):
    path = tmp_path / "nameless.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(RecipeError, match="no name: key"):
        load_recipe(path)


def test_markup_in_user_text_is_printed_literally(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\n'[/x][link=http://evil]click[/link]': 1\n")
    result = CliRunner().invoke(app, ["pretrain", str(path), "--check"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "[/x][link=http://evil]click[/link]" in result.output


def test_an_unexpected_exception_is_one_line_with_a_hint_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    import hssl_cli.recipe

    def broken(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(hssl_cli.recipe, "load_recipe", broken)
    result = CliRunner().invoke(app, ["pretrain", "recipes/quickstart.yaml", "--check"])
    assert result.exit_code == 3 and "unexpected ZeroDivisionError: boom" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output
    debug = CliRunner().invoke(app, ["--debug", "pretrain", "recipes/quickstart.yaml", "--check"])
    assert isinstance(debug.exception, ZeroDivisionError)


def _model_file(tmp_path, tiny_recipe):
    torch.manual_seed(0)
    recipe = tiny_recipe()
    path = tmp_path / "model.safetensors"
    ckpt.save_model(path, build_method(recipe, in_channels=1), recipe, 1, 11, {"loss": 1.0},
                    {"mean": torch.full((1,), 0.3), "std": torch.full((1,), 0.2)})
    return path


def _rewrite(path, change_metadata=None, change_header=None):
    source = path.read_bytes()
    length = struct.unpack("<Q", source[:8])[0]
    header = json.loads(source[8:8 + length])
    if change_metadata:
        change_metadata(header["__metadata__"])
    if change_header:
        change_header(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + source[8 + length:])


@pytest.mark.parametrize("key, value, message", [
    ("format_version", "abc", "format_version='abc' is not a whole number"),
    ("epoch", "1e3", "epoch='1e3' is not a whole number"),
    ("step", "-5", "step='-5' is not a whole number"),
    ("epoch", "12", "epoch=12 exceeds step=11"),
    ("metrics", "{", "metrics is not a JSON dict"),
    ("kind", "[/x]", r"kind='\[/x\]' is none of"),
    ("recipe", "name: x\n" + "#" * 2_000_000, "its stored recipe is 2,000,008 characters"),
])  # fmt: skip
def test_malformed_checkpoint_metadata_is_refused_before_anything_is_built(tmp_path, tiny_recipe, key, value, message):
    path = _model_file(tmp_path, tiny_recipe)
    _rewrite(path, change_metadata=lambda metadata: metadata.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(path)


def test_right_shaped_tensors_of_the_wrong_dtype_are_refused(tmp_path, tiny_recipe):
    from hssl_cli.evaluate.opening import load_trained_method

    path = _model_file(tmp_path, tiny_recipe)
    loaded = ckpt.load_checkpoint(path)
    tensors = dict(loaded.tensors)
    tensors["projector.0.weight"] = tensors["projector.0.weight"].double()
    ckpt.save_safetensors_atomically(path, tensors, {k: v for k, v in loaded.metadata.items()
                                                     if k != ckpt.CHECKSUM})
    with pytest.warns(UserWarning, match="no checksum"):
        reloaded = ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="dtype of projector.0.weight is torch.float64"):
        load_trained_method(reloaded, torch.device("cpu"))


def test_a_huge_declared_header_is_refused_without_reading_the_file(tmp_path):
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 2**40))
        handle.truncate(9 * 2**30)  # a 9 GB sparse file
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        ckpt.load_checkpoint(path)
    assert time.perf_counter() - started < 1


def test_checkpoints_get_the_run_folder_permissions(tmp_path, tiny_recipe):
    previous = os.umask(0o022)
    try:
        path = _model_file(tmp_path, tiny_recipe)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_resume_state_whose_step_does_not_fit_the_run_is_refused(tmp_path, tiny_recipe):
    result = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")
    state = result.run_dir / "last.state.safetensors"
    _rewrite(state, change_metadata=lambda metadata: metadata.update(step="999999999999", epoch="5"))
    with pytest.raises(HsslError, match="step 999999999999 of epoch 5, which does not fit this run"):
        pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu", resume=str(state))
    ckpt_state = ckpt.load_checkpoint(state, kind="training_state", verify=False)
    assert ckpt_state.step == 999999999999


def test_the_temp_file_of_an_interrupted_write_is_removed_on_resume(tmp_path, tiny_recipe):
    from hssl_cli.engine.train import StopRequest

    stop = StopRequest()
    first = pretrain(tiny_recipe(), tmp_path, device_name="cpu", stop=stop,
                     progress=lambda row: stop() if row["step"] >= 3 else None)
    stale = first.run_dir / ".last.safetensors.k9x2.tmp"  # what a kill -9 during a write leaves
    stale.write_bytes(b"half a checkpoint")
    pretrain(tiny_recipe(), tmp_path, device_name="cpu", resume="auto")
    assert not stale.exists()


def test_sigterm_while_the_data_loads_ends_the_run_cleanly(tmp_path, tiny_recipe, monkeypatch):
    import hssl_cli.engine.setup as setup

    load = setup.training_images

    def load_then_sigterm(*args, **kwargs):
        split = load(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return split

    monkeypatch.setattr(setup, "training_images", load_then_sigterm)
    result = pretrain(tiny_recipe(), tmp_path, device_name="cpu")
    assert result.interrupted and result.steps == 0
    assert ckpt.load_checkpoint(result.checkpoint).step == 0  # resume continues from here


def test_an_output_folder_that_cannot_be_created_is_one_clear_error(tmp_path, tiny_recipe):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(HsslError, match="a-file/runs: cannot write the run's files"):
        pretrain(tiny_recipe(), blocker / "runs", device_name="cpu")


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error(tmp_path, tiny_recipe, monkeypatch):
    import errno

    import hssl_cli.engine.checkpoint as checkpoint

    def disk_full(path, tensors, metadata):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors_atomically", disk_full)
    with pytest.raises(HsslError, match="cannot write the run's files \\(No space left on device\\)"):
        pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")


@pytest.mark.parametrize("text, message", [
    (BASE + "seed: !!int abc\n", r"x.yaml:2: refused: seed: the tag !!int does not fit 'abc'; remove the tag"),
    (BASE + "seed: !!float x\n", "x.yaml:2: refused: seed: the tag !!float does not fit 'x'"),
    (BASE + "train: {compile: !!bool maybe}\n", "x.yaml:2: refused: train.compile: the tag !!bool does not fit"),
    (BASE + "seed: !!int [1, 2]\n", "x.yaml:2: refused: seed: the tag !!int does not fit a list"),
    (BASE + "model:\n  projector: [64, !!int x]\n", "x.yaml:3: refused: model.projector.1: the tag !!int"),
    (BASE + "optim: !!map [1]\n", "x.yaml:2: refused: optim: the tag !!map does not fit a list"),
    (BASE + "seed: !!timestamp x\n", "x.yaml:2: refused: seed: the tag !!timestamp does not fit 'x'"),
])  # fmt: skip
def test_an_explicit_tag_that_does_not_fit_its_value_is_refused_naming_the_key(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text, "x.yaml")


def test_a_mistagged_value_in_a_suite_or_recipe_file_is_one_line_through_the_cli(tmp_path):
    from hssl_cli.sweep.suite import load_suite

    recipe = tmp_path / "tagged.yaml"
    recipe.write_text(BASE + "seed: !!int abc\n")
    result = CliRunner().invoke(app, ["pretrain", str(recipe), "--check"])
    assert result.exit_code == 2, result.output
    assert "tagged.yaml:2: refused: seed: the tag !!int does not fit 'abc'" in " ".join(result.output.split())
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\nseeds: [0, !!int abc]\nvariants: [{{name: a, recipe: {recipe.name}}}]\n")
    with pytest.raises(RecipeError, match=r"suite.yaml:2: refused: seeds.1: the tag !!int does not fit 'abc'"):
        load_suite(suite)


def _write_with_header(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("command", ["probe", "collapse-report", "resume", "init-from"])
def test_a_checkpoint_header_of_deeply_nested_json_is_one_clear_error(tmp_path, command):
    path = tmp_path / ("last.state.safetensors" if command == "resume" else "nested.safetensors")
    _write_with_header(path, b"[" * 100_000 + b"]" * 100_000)
    recipe = tmp_path / "tiny.yaml"
    from tests.conftest import TINY_RECIPE

    recipe.write_text(TINY_RECIPE)
    arguments = {"probe": ["probe", str(path)], "collapse-report": ["collapse-report", str(path)],
                 "resume": ["pretrain", str(recipe), "--resume", str(path), "--output", str(tmp_path / "out")],
                 "init-from": ["pretrain", str(recipe), "--init-from", str(path), "--output", str(tmp_path / "out")]}
    result = CliRunner().invoke(app, [*arguments[command], "--device", "cpu"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"{path.name}: not a readable .safetensors file" in output and "its header is nested too deeply" in output


@pytest.mark.parametrize("kind", ["model", "training_state"])
def test_a_checkpoint_cut_short_or_padded_is_refused_with_both_sizes(tmp_path, tiny_recipe, kind):
    path = _model_file(tmp_path, tiny_recipe)
    if kind == "training_state":
        recipe, method = tiny_recipe(), build_method(tiny_recipe(), in_channels=1)
        optimizer = torch.optim.AdamW(method.parameters())
        method.projector(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        path = tmp_path / "last.state.safetensors"
        ckpt.save_training_state(path, method, optimizer, recipe, 1, 11, {"mean": torch.zeros(1), "std": torch.ones(1)})
    assert ckpt.load_checkpoint(path, kind=kind).tensors  # the valid file loads
    size = path.stat().st_size
    os.truncate(path, size - 3)
    with pytest.raises(CheckpointError, match=rf"not a readable .safetensors file \(truncated: the file has "
                                              rf"{size - 3:,} bytes, its header describes {size:,}\)"):
        ckpt.load_checkpoint(path, kind=kind)
    os.truncate(path, 9 * 2**30)  # a 9 GB sparse file: no disk, but more than a 4 GB address space maps
    with pytest.raises(CheckpointError, match=rf"\(padded: the file has 9,663,676,416 bytes, its header describes "
                                              rf"{size:,}\)"):
        ckpt.load_checkpoint(path, kind=kind)


@pytest.mark.parametrize("command", ["collapse-report", "init-from"])
def test_a_9_gb_sparse_checkpoint_is_refused_before_it_is_mapped_under_an_address_space_limit(tmp_path, tiny_recipe,
                                                                                              command):
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import TINY_RECIPE

    resource = pytest.importorskip("resource")  # setrlimit: POSIX only
    path = _model_file(tmp_path, tiny_recipe)
    os.truncate(path, 9 * 2**30)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    limit = 6 * 2**30  # room to import torch (~3.5 GB of address space), not to map 9 GB

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    arguments = (["collapse-report", str(path)] if command == "collapse-report" else
                 ["pretrain", str(recipe), "--init-from", str(path), "--output", str(tmp_path / "out")])
    result = subprocess.run([sys.executable, "-m", "hssl_cli", *arguments, "--device", "cpu"],
                            cwd=Path(__file__).resolve().parents[1], preexec_fn=limited, capture_output=True,
                            text=True, timeout=120)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, output
    assert "(padded: the file has 9,663,676,416 bytes" in output and "MemoryError" not in output


def test_one_forward_pass_is_measured_and_the_images_per_pass_follow_the_budget():
    from hssl_cli.data.augment import normalize
    from hssl_cli.evaluate.forward_memory import forward_bytes, images_per_pass
    from hssl_cli.models.backbones import SmallConvNet

    network = SmallConvNet(in_channels=1).eval()

    def forward(batch):
        return network(normalize(batch, torch.zeros(1), torch.ones(1)))

    one_image = forward_bytes(forward, torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    # float32 outputs of the four convolutions (stride 2 after the first), each once more for its BatchNorm
    convolutions = sum(4 * width * (64 // stride) ** 2 for width, stride in ((32, 1), (64, 2), (128, 4), (256, 8)))
    assert 2 * convolutions <= one_image <= 2.2 * convolutions  # ReLU is in place: it adds nothing
    cpu = torch.device("cpu")
    assert images_per_pass(forward, (1, 64, 64), cpu, 512, budget=(10 * one_image, "test")) == 10
    assert images_per_pass(forward, (1, 64, 64), cpu, 512, budget=(10**6 * one_image, "test")) == 512
    with pytest.raises(HsslError, match=r"at 64x64 px one image takes 1.9 MiB in a forward pass of this model, more "
                                        r"than the evaluation's memory budget of 1.0 MiB \(a test budget\)"):
        images_per_pass(forward, (1, 64, 64), cpu, 512, budget=(2**20, "a test budget"))


@pytest.fixture
def batch_sizes():
    """The batch size of every (N, C, H, W) tensor a module is called with, while the test runs."""
    from torch.nn.modules.module import register_module_forward_hook

    sizes = []
    handle = register_module_forward_hook(
        lambda module, args, output: sizes.append(args[0].shape[0])
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4 else None)
    yield sizes
    handle.remove()


def test_evaluations_run_in_the_batches_a_memory_budget_allows_with_the_same_results(tmp_path, tiny_recipe,
                                                                                      monkeypatch, batch_sizes):
    from hssl_cli.evaluate import forward_memory
    from hssl_cli.evaluate.commands.augmentation_probe import augmentation_probe
    from hssl_cli.evaluate.commands.collapse_report import collapse_report
    from hssl_cli.evaluate.commands.probe import probe_checkpoint

    path = _model_file(tmp_path, tiny_recipe)  # digits at 16 px

    def evaluate() -> tuple[dict, dict, dict]:
        return (collapse_report(path, samples=200, device_name="cpu", progress=False),
                probe_checkpoint(path, device_name="cpu", progress=False, train_samples=200, test_samples=100,
                                 cache=False),
                augmentation_probe(path, samples=200, device_name="cpu"))

    whole = evaluate()
    assert max(batch_sizes) >= 200  # today's passes: every image at once (up to 512)
    batch_sizes.clear()
    monkeypatch.setattr(forward_memory, "memory_budget", lambda device: (2**20, "a test budget"))
    bounded = evaluate()
    assert max(batch_sizes) <= 8  # 1 MiB over 0.1-0.3 MiB an image (x2: the augmentation probe pairs its views)
    for layer, spectrum in whole[0]["layers"].items():
        assert bounded[0]["layers"][layer]["effective_rank"] == pytest.approx(spectrum["effective_rank"], rel=1e-4)
    for name, result in whole[1]["results"].items():
        assert bounded[1]["results"][name]["top1"] == pytest.approx(result["top1"], abs=1.0), name
    assert bounded[2]["r2_by_parameter"] == pytest.approx(whole[2]["r2_by_parameter"], abs=1e-3)


@pytest.mark.parametrize("command", ["probe", "collapse-report"])
def test_an_image_too_large_for_the_memory_budget_is_one_clear_error(tmp_path, tiny_recipe, monkeypatch, command):
    from hssl_cli.evaluate import forward_memory

    path = _model_file(tmp_path, tiny_recipe)
    monkeypatch.setattr(forward_memory, "memory_budget", lambda device: (10_000, "a test budget"))
    no_cache = ["--no-cache"] if command == "probe" else []
    result = CliRunner().invoke(app, [command, str(path), "--device", "cpu", *no_cache])
    assert result.exit_code == 2, result.output
    assert re.search(r"at 16x16 px one image takes 0\.\d MiB in a forward pass of this model, more than the "
                     r"evaluation's memory budget of 0\.0 MiB \(a test budget\); evaluate on a machine \(or --device\) "
                     r"with more memory", " ".join(result.output.split())), result.output


def test_a_linear_probe_on_a_few_labels_per_class_holds_out_one_image_of_each():
    from hssl_cli.evaluate.measures.frozen_probes import fit_linear_probe, stratified_holdout

    labels = torch.arange(10).repeat(4)  # 4 images a class: 10% of each rounds to none
    assert not stratified_holdout(labels, 0.1, seed=0).any()
    held = stratified_holdout(labels, 0.1, seed=0, at_least=1)
    assert torch.equal(labels[held].sort().values, torch.arange(10))
    many = torch.arange(10).repeat(30)  # where 10% holds some out, at_least=1 changes nothing
    assert torch.equal(stratified_holdout(many, 0.1, seed=0, at_least=1), stratified_holdout(many, 0.1, seed=0))
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) + labels[:, None]
    assert fit_linear_probe(features, labels, 10).weight_decay in (0, 1e-5, 1e-4, 1e-3, 1e-2)
    with pytest.raises(ValueError, match="no class of the 10 train samples has two"):
        fit_linear_probe(features[:10], labels[:10], 10)


def test_probe_on_a_tenth_of_400_labels_works_and_on_one_a_class_is_one_clear_error(tmp_path, tiny_recipe):
    path = _model_file(tmp_path, tiny_recipe)
    result = CliRunner().invoke(app, ["probe", str(path), "--train-samples", "400", "--labels", "10%", "--json",
                                      "--no-cache", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train_size"] == 40 and report["results"]["linear"]["top1"] > 0
    result = CliRunner().invoke(app, ["probe", str(path), "--train-samples", "10", "--labels", "10%", "--no-cache",
                                      "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert re.search(r"\d train images, none of a class with two or more: the linear probe chooses its weight decay on "
                     r"held-out images; keep more with --labels or --train-samples", " ".join(result.output.split()))
