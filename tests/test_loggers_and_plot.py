"""train.loggers (CSV, TensorBoard, W&B) carry every metric row of metrics.jsonl; `hssl plot` overlays runs."""

import csv
import json
import sys
import types

import pytest
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.plot import plot_runs, read_run, run_folders
from hssl_cli.evaluate.measures.spectrum import training_diagnostics
from hssl_cli.evaluate.monitor import OnlineMonitor
from tests.conftest import train_stopped_and_resumed


def jsonl_numbers(run_dir):
    """{(step, metric): value} of every number in metrics.jsonl."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in row.items():
            if name not in ("step", "epoch") and isinstance(value, float | int):
                values[(row["step"], name)] = float(value)
    return values


def test_csv_and_tensorboard_hold_every_number_of_the_jsonl_log(tmp_path, tiny_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe("train.loggers=[jsonl, csv, tensorboard]", "train.diagnostics_every=1",
                         "train.monitor={every: 1, samples: 50}")
    result = pretrain(recipe, tmp_path, device_name="cpu", diagnostics=training_diagnostics,
                      monitor=OnlineMonitor(recipe))
    expected = jsonl_numbers(result.run_dir)
    assert any(name.startswith("monitor/") for _, name in expected)
    assert any(name.startswith("diagnostics/") for _, name in expected)

    with (result.run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(int(row["step"]), row["metric"]): float(row["value"]) for row in rows} == expected

    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = {(event.step, tag): event.value for tag in events.Tags()["scalars"] for event in events.Scalars(tag)}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())


def test_a_resumed_run_appends_to_its_csv_and_purges_tensorboard_steps_it_rewrites(tmp_path, tiny_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe("train.loggers=[csv, tensorboard]", "train.log_every=1")
    whole, stopped, resumed = train_stopped_and_resumed(recipe, tmp_path, stop_step=5)
    assert resumed.run_dir == stopped.run_dir
    with (resumed.run_dir / "metrics.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    assert header == ["step", "epoch", "metric", "value"]  # written once
    losses = [(int(step), float(value)) for step, _, metric, value in rows if metric == "loss"]
    assert [step for step, _ in losses][-1] == whole.steps
    events = EventAccumulator(str(resumed.run_dir / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("loss")]
    assert steps == sorted(set(steps)) and steps[-1] == whole.steps  # no step twice, no doubling back


def test_wandb_receives_the_rows_and_keeps_one_run_id_across_a_resume(tmp_path, tiny_recipe, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, metrics, step):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.__spec__ = types.SimpleNamespace(name="wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    recipe = tiny_recipe("train.loggers=[wandb]")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    pretrain(recipe, tmp_path, device_name="cpu", resume=str(result.run_dir))
    assert [call["id"] for call in calls["init"]] == ["abc123", "abc123"]
    assert calls["init"][0]["config"]["name"] == "tiny" and calls["finish"] == 2
    logged_losses = {step: metrics["loss"] for step, metrics in calls["log"] if "loss" in metrics}
    assert logged_losses == {step: value for (step, name), value in jsonl_numbers(result.run_dir).items()
                             if name == "loss"}


def test_wandb_is_refused_at_load_when_it_is_not_installed(tiny_recipe, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(HsslError, match="train.loggers: wandb is not installed"):
        tiny_recipe("train.loggers=[wandb]")


def test_plot_reads_a_resumed_run_once_and_writes_each_format(tmp_path, tiny_recipe):
    recipe = tiny_recipe("train.log_every=1")
    whole, stopped, resumed = train_stopped_and_resumed(recipe, tmp_path, stop_step=5)
    for run in (whole, resumed):  # the diagnostics rows the CLI's hook would have written
        with (run.run_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": 22, "epoch": 2, "diagnostics/backbone/effective_rank": 7.5}) + "\n")
    # a killed run's rows after its checkpoint, then the resumed run's rows for the same steps: later rows win
    with (resumed.run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "epo')  # a line cut short by a kill
    with pytest.warns(match="skipped 1 unreadable line"):
        curves = read_run(resumed.run_dir)
    reference = read_run(whole.run_dir)
    assert curves.series["loss"] == pytest.approx(reference.series["loss"])
    folders = run_folders([tmp_path])
    assert set(folders) == {whole.run_dir, resumed.run_dir}
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        out = tmp_path / f"curves{suffix}"
        panels = plot_runs([reference, curves], out)
        assert out.read_bytes().startswith(magic)
    assert panels[:2] == ["loss", "lr"] and "diagnostics/backbone/effective_rank" in panels


def test_hssl_plot_command_names_what_is_wrong(tmp_path, tiny_recipe):
    runner = CliRunner()
    result = runner.invoke(app, ["plot", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no metrics.jsonl here or below" in result.output
    run = pretrain(tiny_recipe("train.epochs=1"), tmp_path, device_name="cpu")
    result = runner.invoke(app, ["plot", str(run.checkpoint), "--out", str(tmp_path / "c.jpg")])
    assert result.exit_code == 2 and "give a .png, .pdf or .svg file" in result.output
    result = runner.invoke(app, ["plot", str(run.checkpoint), "--out", str(tmp_path / "c.png"), "--metric", "nope*"])
    assert result.exit_code == 2 and "they log: " in result.output and "loss" in result.output
    result = runner.invoke(app, ["plot", str(run.run_dir), "--out", str(tmp_path / "c.png"), "--label", "a",
                                 "--label", "b"])
    assert result.exit_code == 2 and "one per run" in result.output
    result = runner.invoke(app, ["plot", str(run.run_dir), "--out", str(tmp_path / "c.png"), "--label", "mine"])
    assert result.exit_code == 0 and (tmp_path / "c.png").stat().st_size > 1000
