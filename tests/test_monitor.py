"""The online monitor: kNN (and linear) top-1 of the frozen backbone while training runs, in the log,
the progress rows and the result; changing it does not block a resume."""

import json

from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.engine.train import pretrain
from hssl_cli.evaluate.monitor import OnlineMonitor
from tests.conftest import train_stopped_and_resumed


def test_the_monitor_scores_every_epoch_into_the_log_and_the_result(tmp_path, tiny_recipe):
    recipe = tiny_recipe("train.monitor={every: 1, linear: true, samples: 300}")
    rows = []
    result = pretrain(recipe, tmp_path, device_name="cpu", progress=rows.append, monitor=OnlineMonitor(recipe))
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    monitored = [row for row in logged if "monitor/knn_k20_top1" in row]
    assert [row["epoch"] for row in monitored] == [1, 2]
    assert all(10 < row["monitor/knn_k20_top1"] <= 100 and 10 < row["monitor/linear_top1"] <= 100
               for row in monitored)  # 10 digit classes: chance is 10%
    assert result.monitor == {key: value for key, value in monitored[-1].items() if key.startswith("monitor/")}
    assert sum("monitor/knn_k20_top1" in row for row in rows) == 2


def test_held_out_train_images_are_disjoint_from_the_fitted_ones(tiny_recipe):
    monitor = OnlineMonitor(tiny_recipe("train.monitor={split: train, samples: 500}"))
    fitted = {bytes(image.numpy()) for image in monitor.fit_images}
    assert len(monitor.scored_images) == 500 and not any(bytes(i.numpy()) in fitted for i in monitor.scored_images)


def test_turning_the_monitor_on_does_not_block_a_resume(tmp_path, tiny_recipe):
    whole, first, second = train_stopped_and_resumed(tiny_recipe(), tmp_path, stop_step=4)
    resumed = pretrain(tiny_recipe("train.monitor={every: 1}"), tmp_path / "split", device_name="cpu",
                       resume=str(first.run_dir))
    assert resumed.run_dir == first.run_dir


def test_pretrain_prints_the_monitor_in_its_summary(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    from tests.conftest import TINY_RECIPE

    recipe.write_text(TINY_RECIPE.replace("log_every: 3}", "log_every: 3, monitor: {every: 2}}"))
    result = CliRunner().invoke(app, ["pretrain", str(recipe), "--output", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "kNN(20) top-1" in result.output
