import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError, TrainingDiverged
from tests.conftest import METHOD_OVERRIDES, train_stopped_and_resumed


def _weights(path):
    return load_file(path)


def test_run_folder_holds_checkpoints_log_and_recipe(tmp_path, tiny_recipe):
    result = pretrain(tiny_recipe(), tmp_path, device_name="cpu")
    assert result.run_dir.parent == tmp_path / "tiny"
    names = sorted(p.name for p in result.run_dir.iterdir())
    assert names == ["epoch-0001.safetensors", "epoch-0002.safetensors", "last.safetensors",
                     "last.state.safetensors", "metrics.jsonl", "recipe.yaml"]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result.steps == 2 * (1437 // 128)
    assert all(key in rows[0] for key in ("loss", "lr", "images_per_second", "epoch"))
    checkpoint = load_checkpoint(result.checkpoint)
    assert checkpoint.metadata["method"] == "simclr" and checkpoint.epoch == 2
    assert checkpoint.recipe == tiny_recipe()
    assert {key.split(".")[0] for key in checkpoint.tensors} == {"backbone", "projector", "data"}


def test_training_lowers_the_loss(tmp_path, tiny_recipe):
    pretrain(tiny_recipe("train.epochs=3", "train.log_every=1"), tmp_path, device_name="cpu")
    rows = [json.loads(line) for line in next(tmp_path.glob("tiny/*/metrics.jsonl")).read_text().splitlines()]
    assert sum(r["loss"] for r in rows[-5:]) / 5 < sum(r["loss"] for r in rows[:5]) / 5 - 0.3


def test_resume_across_an_epoch_boundary_continues_bit_exact(tmp_path, tiny_recipe):
    """Every method resumes bit-exact within an epoch (test_method_protocol); here the stop falls in epoch 1
    and the resumed run crosses into epoch 2 (a new data order)."""
    whole, first, second = train_stopped_and_resumed(tiny_recipe(), tmp_path, stop_step=6)
    assert first.interrupted and first.steps == 6
    assert second.run_dir == first.run_dir and second.steps == whole.steps
    expected, resumed = _weights(whole.checkpoint), _weights(second.checkpoint)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_resume_with_a_changed_recipe_is_refused_naming_the_keys(tmp_path, tiny_recipe):
    result = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")
    changes = r"optim.lr \(0.002 -> 0.1\), train.epochs \(1 -> 2\); .* --init-from"
    with pytest.raises(HsslError, match=f"differs from the run's in {changes}"):
        pretrain(tiny_recipe("optim.lr=0.1"), tmp_path, device_name="cpu", resume=str(result.run_dir))
    # keys that do not alter the run may change
    pretrain(tiny_recipe("train.epochs=1", "train.log_every=7"), tmp_path, device_name="cpu",
             resume=str(result.checkpoint))


def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(tmp_path, tiny_recipe, request):
    stop_after_first_epoch = tiny_recipe("train.epochs=1")
    good = pretrain(stop_after_first_epoch, tmp_path, device_name="cpu")
    before = good.checkpoint.read_bytes()
    request.getfixturevalue("nan_loss")
    with pytest.raises(TrainingDiverged, match="NaN/inf"):
        pretrain(tiny_recipe("optim.warmup_epochs=0"), tmp_path, device_name="cpu", resume=None)
    assert good.checkpoint.read_bytes() == before
    diverged_run = max((tmp_path / "tiny").iterdir())
    assert not (diverged_run / "last.safetensors").exists()


def test_sigterm_writes_a_checkpoint_and_returns(tmp_path, tiny_recipe):
    def send_sigterm(row):
        if row["step"] >= 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = pretrain(tiny_recipe(), tmp_path, device_name="cpu", progress=send_sigterm)
    assert result.interrupted and 3 <= result.steps < 2 * (1437 // 128)
    assert load_checkpoint(result.checkpoint).step == result.steps
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back, not the run's


def test_batch_larger_than_the_dataset_is_a_user_error(tmp_path, tiny_recipe):
    with pytest.raises(HsslError, match="train.batch_size=5000 exceeds the 1437 images"):
        pretrain(tiny_recipe("train.batch_size=5000"), tmp_path, device_name="cpu")


def test_resume_auto_without_an_earlier_run_starts_one(tmp_path, tiny_recipe):
    result = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu", resume="auto")
    assert not result.interrupted and result.checkpoint.exists()
    again = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu", resume="auto")
    assert again.run_dir == result.run_dir and again.steps == result.steps  # found the finished run


def test_explicit_resume_path_that_does_not_exist_is_a_user_error(tmp_path, tiny_recipe):
    with pytest.raises(HsslError, match="no such checkpoint file"):
        pretrain(tiny_recipe(), tmp_path, device_name="cpu", resume=str(tmp_path / "nowhere"))


def test_data_subset_limits_the_pretraining_images(tmp_path, tiny_recipe):
    result = pretrain(tiny_recipe("data.subset=300", "train.batch_size=100", "train.epochs=1"), tmp_path,
                      device_name="cpu")
    assert result.steps == 3


@pytest.mark.parametrize("case", sorted(METHOD_OVERRIDES))
def test_a_bf16_autocast_step_gives_the_fp32_loss_and_finite_updates(tiny_recipe, case):
    """The GPU path's bf16 autocast, run on the CPU: every method's dtypes meet, and the loss agrees with
    fp32 to bf16 precision."""
    from hssl_cli.data.sources import load_split
    from hssl_cli.data.statistics import channel_stats
    from hssl_cli.data.views import build_pipelines
    from hssl_cli.engine.optim import build_optimizer
    from hssl_cli.engine.train import training_step
    from hssl_cli.methods import build_method

    recipe = tiny_recipe(*METHOD_OVERRIDES[case])
    images = load_split(recipe.data, "train").images[:32]
    mean, std = (stat.float() for stat in channel_stats(images))
    pipelines = build_pipelines(recipe, mean, std)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        method = build_method(recipe, in_channels=1)
        before = [p.detach().clone() for p in method.parameters()]
        optimizer = build_optimizer(method, recipe.optim)
        generator = torch.Generator().manual_seed(1)
        losses[bf16] = training_step(method, optimizer, pipelines, recipe.method.consumes.original, mean, std, images,
                                     generator, 1e-3, bf16)["loss"]
        after = list(method.parameters())
        assert all(p.isfinite().all() for p in after)
        assert any(not torch.equal(old, new) for old, new in zip(before, after, strict=True))
    assert losses[True].dtype == torch.float32
    assert losses[True].item() == pytest.approx(losses[False].item(), rel=0.03, abs=0.02)
