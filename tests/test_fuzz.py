"""Hostile input never gives a traceback: a few hundred mutated recipes and corrupted checkpoints through
the loaders must either succeed or raise HsslError (the CLI's one red line). Seeded, so deterministic;
scripts/fuzz_cli.py runs thousands of them through the real CLI."""

import random
import time

import pytest
import torch

from hssl_cli.engine import checkpoint as ckpt
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.opening import load_trained_method
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe
from tests.fuzzing import corrupted_checkpoint, mutated_recipe

pytestmark = pytest.mark.filterwarnings("ignore::hssl_cli.errors.CheckpointNote")  # files without a checksum

RECIPE_CASES = 300
CHECKPOINT_CASES = 150


def test_mutated_recipes_parse_or_are_one_clear_error():
    rng = random.Random(0)
    outcomes = {"accepted": 0, "refused": 0}
    started = time.perf_counter()
    for _ in range(RECIPE_CASES):
        text, overrides = mutated_recipe(rng)
        try:
            parse_recipe(text, "fuzz.yaml", overrides)
            outcomes["accepted"] += 1
        except HsslError as error:
            assert "\n" not in str(error).strip() or "Traceback" not in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > RECIPE_CASES / 3 and outcomes["accepted"] > 0, outcomes
    assert time.perf_counter() - started < 30  # no mutation hangs the loader


def _checkpoint(tmp_path, tiny_recipe, kind: str):
    torch.manual_seed(0)
    recipe = tiny_recipe()
    method = build_method(recipe, in_channels=1)
    stats = {"mean": torch.full((1,), 0.3), "std": torch.full((1,), 0.2)}
    path = tmp_path / f"source.{kind}.safetensors"
    if kind == "model":
        ckpt.save_model(path, method, recipe, 1, 11, {"loss": 1.0}, stats)
    else:
        optimizer = torch.optim.AdamW(method.parameters())
        method.projector(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        ckpt.save_training_state(path, method, optimizer, recipe, 1, 11, stats)
    return recipe, path.read_bytes()


@pytest.mark.parametrize("kind", ["model", "training_state"])
def test_corrupted_checkpoints_load_or_are_one_clear_error(tmp_path, tiny_recipe, kind):
    recipe, source = _checkpoint(tmp_path, tiny_recipe, kind)
    rng = random.Random(1 if kind == "model" else 2)
    outcomes = {"loaded": 0, "refused": 0}
    for index in range(CHECKPOINT_CASES):
        path = tmp_path / f"case{index}.safetensors"
        what = corrupted_checkpoint(rng, source, path)
        try:
            loaded = ckpt.load_checkpoint(path, kind=kind)
            if kind == "model":
                load_trained_method(loaded, torch.device("cpu"))
            else:
                method = build_method(loaded.recipe, in_channels=1)
                ckpt.load_module_state(method, loaded.prefixed("model"), path, "model")
                ckpt.restore_optimizer(torch.optim.AdamW(method.parameters()), loaded)
            outcomes["loaded"] += 1
        except HsslError:
            outcomes["refused"] += 1
        except Exception as error:  # pragma: no cover - the failure message names the case
            raise AssertionError(f"case {index} ({what}): {type(error).__name__}: {error}") from error
    assert outcomes["refused"] > CHECKPOINT_CASES / 2, outcomes


def test_a_flipped_bit_in_the_tensor_data_is_caught_by_the_checksum(tmp_path, tiny_recipe):
    _, source = _checkpoint(tmp_path, tiny_recipe, "model")
    corrupted = bytearray(source)
    corrupted[-5] ^= 0x10  # inside the last tensor's bytes
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(corrupted))
    with pytest.raises(HsslError, match="do not match the checksum"):
        ckpt.load_checkpoint(path)
    assert ckpt.load_checkpoint(path, verify=False).tensors  # --no-verify loads it anyway
