"""`hssl sweep`: suites of pretrain + probe cells, skipped when finished, resumed when killed, shared
between processes, aggregated into mean ± std over seeds."""

import json
import os
import signal
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.errors import HsslError, RecipeError
from hssl_cli.sweep.claims import decide, paired_interval
from hssl_cli.sweep.report import collect
from hssl_cli.sweep.run import cell_folder, cell_lock, read_result, run_cell
from hssl_cli.sweep.suite import load_suite
from tests.conftest import TINY_RECIPE

runner = CliRunner()

SUITE = """
name: tiny_suite
description: SimCLR beats nothing at all
seeds: [0, 1]
set: [train.epochs=1, train.batch_size=256, train.diagnostics_every=0]
variants:
  - {name: untrained, recipe: tiny.yaml, set: [train.epochs=0]}
  - {name: simclr, recipe: tiny.yaml, label: "SimCLR, 1 epoch"}
probe: {train_samples: 400, test_samples: 200}
report: {metrics: [linear, knn_k20, train/loss]}
"""


@pytest.fixture
def suite_file(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def _sweep(*arguments):
    return runner.invoke(app, ["sweep", *map(str, arguments), "--device", "cpu"])


def test_cells_are_variants_times_seeds_with_resolved_recipes(suite_file):
    loaded = load_suite(suite_file)
    assert [cell.id for cell in loaded.cells] == ["untrained-seed0", "untrained-seed1", "simclr-seed0", "simclr-seed1"]
    assert [cell.recipe.seed for cell in loaded.cells] == [0, 1, 0, 1]
    assert [cell.recipe.train.epochs for cell in loaded.cells] == [0, 0, 1, 1]
    assert loaded.cells[2].recipe.train.batch_size == 256


def test_a_swept_key_multiplies_the_cells_and_is_typed_by_the_recipe_schema(suite_file):
    suite_file.write_text(SUITE + "sweep: {key: optim.lr, values: [0.001, 0.01]}\n")
    loaded = load_suite(suite_file)
    assert len(loaded.cells) == 8
    assert loaded.cells[2].id == "untrained-lr=0.01-seed0" and loaded.cells[2].recipe.optim.lr == 0.01


def test_sweep_runs_every_cell_then_reports_mean_and_std_over_seeds(suite_file, tmp_path):
    output = tmp_path / "out"
    result = _sweep(suite_file, "--output", output)
    assert result.exit_code == 0, result.output
    loaded = load_suite(suite_file)
    results = [json.loads((cell_folder(output, loaded, cell) / "result.json").read_text()) for cell in loaded.cells]
    assert [r["status"] for r in results] == ["finished"] * 4
    assert [r["steps"] for r in results] == [0, 0, 5, 5]  # the 1,437 train digits // 256 = 5 steps per epoch

    report = json.loads(_sweep(suite_file, "--output", output, "--report", "--json").stdout)
    simclr = report["groups"][1]
    linear = [r["metrics"]["linear"] for r in results[2:]]
    assert simclr["label"] == "SimCLR, 1 epoch" and simclr["finished"] == 2
    assert simclr["metrics"]["linear"]["mean"] == pytest.approx(statistics.fmean(linear))
    assert simclr["metrics"]["linear"]["std"] == pytest.approx(statistics.stdev(linear))
    assert report["groups"][0]["metrics"]["train/loss"]["n"] == 0  # nothing trained, no loss
    folder = output / "tiny_suite"
    markdown = (folder / "report.md").read_text()
    assert "| SimCLR, 1 epoch | 2/2 |" in markdown and "400 train / 200 test images" in markdown
    assert (folder / "report.csv").read_text().count("\n") == 5
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_finished_cells_are_skipped_and_one_cell_can_run_alone(suite_file, tmp_path):
    output = tmp_path / "out"
    assert _sweep(suite_file, "--output", output, "--cell", "2").exit_code == 0
    loaded = load_suite(suite_file)
    done = cell_folder(output, loaded, loaded.cells[2]) / "result.json"
    assert done.is_file() and not cell_folder(output, loaded, loaded.cells[3]).exists()
    before = done.read_text()
    again = _sweep(suite_file, "--output", output, "--cell", "2")
    assert "finished earlier; skipped" in again.output and done.read_text() == before
    listed = json.loads(_sweep(suite_file, "--output", output, "--list", "--json").stdout)
    assert [row["status"] for row in listed] == ["pending", "pending", "finished", "pending"]
    partial = json.loads(_sweep(suite_file, "--output", output, "--report", "--json").stdout)
    assert [group["finished"] for group in partial["groups"]] == [0, 1]


def test_a_cell_stopped_by_a_signal_resumes_its_pretraining_bit_exact(suite_file, tmp_path):
    loaded = load_suite(suite_file)
    cell = loaded.cells[2]

    def preempt(row):  # what SLURM does near a time limit: SIGUSR1 to the process
        if row["step"] >= 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    stopped = run_cell(loaded, cell, tmp_path / "a", "cpu", progress=preempt)
    assert stopped == {"status": "interrupted"}
    assert not (cell_folder(tmp_path / "a", loaded, cell) / "result.json").exists()
    resumed = run_cell(loaded, cell, tmp_path / "a", "cpu")
    whole = run_cell(loaded, cell, tmp_path / "b", "cpu")
    assert resumed["status"] == "finished" and resumed["metrics"] == whole["metrics"]
    first, second = load_file(resumed["checkpoint"]), load_file(whole["checkpoint"])
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_cell_held_by_another_process_is_left_to_it(suite_file, tmp_path):
    loaded = load_suite(suite_file)
    folder = cell_folder(tmp_path, loaded, loaded.cells[0])
    messages = []
    with cell_lock(folder) as held:
        assert held
        assert run_cell(loaded, loaded.cells[0], tmp_path, "cpu", status=messages.append) is None
    assert messages == ["running in another process; skipped"] and not (folder / "result.json").exists()


def test_an_edited_suite_is_refused_instead_of_mixing_results(suite_file, tmp_path):
    assert _sweep(suite_file, "--output", tmp_path, "--cell", "0").exit_code == 0
    suite_file.write_text(SUITE.replace("train.batch_size=256", "train.batch_size=128"))
    result = _sweep(suite_file, "--output", tmp_path, "--report")
    assert result.exit_code == 2 and "train.batch_size" in result.output and "delete the folder" in result.output
    with pytest.raises(HsslError, match="train.batch_size"):
        collect(load_suite(suite_file), tmp_path)


def test_a_diverged_cell_is_a_result_counted_in_the_report(suite_file, tmp_path, nan_loss):
    result = _sweep(suite_file, "--output", tmp_path)
    assert result.exit_code == 0, result.output
    assert "diverged" in result.output
    report = json.loads(_sweep(suite_file, "--output", tmp_path, "--report", "--json").stdout)
    assert report["groups"][1]["diverged"] == 2 and report["groups"][1]["metrics"]["linear"]["n"] == 0


@pytest.mark.parametrize(("text", "message"), [
    ("variants: [{name: a, recipe: tiny.yaml}]\nsedes: [1]\n",
     "suite.yaml:2: unknown key 'sedes'; did you mean 'seeds'?"),
    ("variants: [{name: a, recipe: tiny.yaml, sett: []}]\n", "unknown key 'variants.0.sett'; did you mean"),
    ("variants:\n  - {name: a, recipe: tiny.yaml, set: [optim.lr=fast]}\n",
     "suite.yaml:2: variant 'a': --set optim.lr"),
    ("variants: [{name: a, recipe: missing.yaml}]\n", "no recipe file missing.yaml"),
    ("variants: [{name: a, recipe: tiny.yaml}, {name: a, recipe: tiny.yaml}]\n", "'a' is used twice"),
    ("variants: [{name: a, recipe: tiny.yaml}]\nreport: {metrics: [linear], plot: knn}\n", "report.plot 'knn'"),
    ("- just a list\n", "a suite is a YAML mapping"),
    ("name: caf\xe9\n", "not UTF-8 text (byte 9)"),
])
def test_bad_suites_are_one_line_errors_naming_the_file(suite_file, text, message):
    suite_file.write_bytes(text.encode("latin-1"))
    with pytest.raises(RecipeError) as error:
        load_suite(suite_file)
    assert message in str(error.value) and "\n" not in str(error.value)
    result = _sweep(suite_file)
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("suites/**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_resolves_with_at_least_three_seeds(path):
    loaded = load_suite(path)
    assert len(loaded.suite.seeds) >= 3 and len(loaded.cells) >= 3 * len(loaded.suite.variants)
    assert len({cell.id for cell in loaded.cells}) == len(loaded.cells)


def test_the_report_table_prints_suite_text_literally_not_as_markup(suite_file, tmp_path):
    from rich.console import Console

    from hssl_cli.render import sweep_table
    from hssl_cli.sweep.report import table_rows

    suite_file.write_text(SUITE.replace('label: "SimCLR, 1 epoch"', 'label: "SimCLR [/x] [bold]"'))
    console = Console(record=True, width=200)
    console.print(sweep_table("suite", *table_rows(collect(load_suite(suite_file), tmp_path))))
    assert "SimCLR [/x] [bold]" in console.export_text()


def test_claims_are_decided_from_seed_paired_cells_and_written_to_the_report(suite_file, tmp_path):
    suite_file.write_text(SUITE + "claims:\n  - {a: simclr, b: untrained, metric: linear, test: greater}\n"
                          "  - {a: simclr, b: untrained, metric: knn_k20, test: equivalent, margin: 50,"
                          " label: within fifty points}\n")
    output = tmp_path / "out"
    assert _sweep(suite_file, "--output", output).exit_code == 0
    loaded = load_suite(suite_file)
    results = [json.loads((cell_folder(output, loaded, cell) / "result.json").read_text()) for cell in loaded.cells]
    report = json.loads(_sweep(suite_file, "--output", output, "--report", "--json").stdout)
    greater, equivalent = report["claims"]
    by = {(r["variant"], r["seed"]): r["metrics"] for r in results}
    assert greater["differences"] == [by["simclr", s]["linear"] - by["untrained", s]["linear"] for s in (0, 1)]
    assert greater["seeds"] == [0, 1]
    for claim, margin in ((greater, None), (equivalent, 50.0)):  # the report's numbers are the rule's, recomputed
        interval = paired_interval(claim["differences"])
        assert claim["interval"] == pytest.approx([interval.low, interval.high])
        assert claim["verdict"] == decide(interval, claim["test"], margin)
    assert equivalent["label"] == "within fifty points"
    assert equivalent["statement"] == "simclr ≈ untrained within ±50 (knn_k20)"
    markdown = (output / "tiny_suite" / "report.md").read_text()
    assert "| within fifty points | simclr ≈ untrained within ±50 (knn_k20) |" in markdown
    assert "Cells made by hssl 0.1.0 at" in markdown
    assert all(set(r["provenance"]) == {"hssl_version", "commit"} for r in results)
    printed = _sweep(suite_file, "--output", output, "--report").output
    assert "claims: seed-paired a - b" in printed and "within fifty points" in printed


def test_adding_seeds_to_a_finished_suite_reuses_its_cells(suite_file, tmp_path):
    output = tmp_path / "out"
    assert _sweep(suite_file, "--output", output, "--cell", "2").exit_code == 0  # simclr, seed 0
    loaded = load_suite(suite_file)
    done = cell_folder(output, loaded, loaded.cells[2]) / "result.json"
    before = done.read_text()
    suite_file.write_text(SUITE.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    grown = load_suite(suite_file)
    assert [cell.id for cell in grown.cells][3] == "simclr-seed0"
    again = _sweep(suite_file, "--output", output, "--cell", "3")
    assert again.exit_code == 0 and "finished earlier; skipped" in again.output and done.read_text() == before
    report = json.loads(_sweep(suite_file, "--output", output, "--report", "--json").stdout)
    assert report["groups"][1]["finished"] == 1 and report["groups"][1]["cells"] == 3


@pytest.mark.parametrize(("claim", "message"), [
    ("{a: simclr, b: nobody, test: greater}", "claims.0: no variant 'nobody'"),
    ("{a: simclr, b: simclr, test: greater}", "a and b are both 'simclr'"),
    ("{a: simclr, b: untrained, test: equivalent}", "test equivalent needs a margin"),
    ("{a: simclr, b: untrained, test: greater, margin: 1}", "test greater takes none"),
    ("{a: simclr, b: untrained, test: greater, value: 3}", "value 3 is not a value of the swept key"),
    ("{a: simclr, b: untrained, test: better}", "claims.0.test"),
])
def test_bad_claims_are_one_line_errors(suite_file, claim, message):
    suite_file.write_text(SUITE + f"claims:\n  - {claim}\n")
    with pytest.raises(RecipeError) as error:
        load_suite(suite_file)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_online_monitor_of_a_cell_gives_accuracy_against_epoch(suite_file, tmp_path):
    suite_file.write_text(SUITE.replace("train.diagnostics_every=0]",
                                        "train.diagnostics_every=0, train.epochs=2, 'train.monitor={every: 1, "
                                        "samples: 100}']")
                          + "claims:\n  - {a: simclr, b: untrained, metric: monitor/knn_k20_top1@1, test: greater}\n")
    suite_file.write_text(suite_file.read_text().replace("report: {metrics: [linear, knn_k20, train/loss]}",
                                                         "report: {metrics: [linear, monitor/knn_k20_top1@2], "
                                                         "curve: monitor/knn_k20_top1}"))
    output = tmp_path / "out"
    assert _sweep(suite_file, "--output", output, "--cell", "2").exit_code == 0
    assert _sweep(suite_file, "--output", output, "--cell", "3").exit_code == 0
    loaded = load_suite(suite_file)
    result = json.loads((cell_folder(output, loaded, loaded.cells[2]) / "result.json").read_text())
    assert {"monitor/knn_k20_top1@1", "monitor/knn_k20_top1@2"} <= set(result["metrics"])
    report = json.loads(_sweep(suite_file, "--output", output, "--report", "--json").stdout)
    assert report["groups"][1]["metrics"]["monitor/knn_k20_top1@2"]["n"] == 2
    assert report["claims"][0]["seeds"] == []  # the untrained cells have not run: nothing to pair
    assert (output / "tiny_suite" / "report-curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "report.png, report-curve.png" in _sweep(suite_file, "--output", output, "--report").output
    suite_file.write_text(suite_file.read_text().replace("curve: monitor/knn_k20_top1", "curve: monitor/knn_top1"))
    assert "report.curve monitor/knn_top1: no finished cell logged it" in _sweep(
        suite_file, "--output", output, "--report").output


def test_a_suite_probes_with_the_papers_protocol_and_old_results_keep_matching(suite_file, tmp_path):
    suite_file.write_text(SUITE.replace("probe: {train_samples: 400, test_samples: 200}",
                                        "probe: {train_samples: 400, test_samples: 200, protocol: standard, "
                                        "epochs: 2}"))
    output = tmp_path / "out"
    assert _sweep(suite_file, "--output", output, "--cell", "0").exit_code == 0
    loaded = load_suite(suite_file)
    path = cell_folder(output, loaded, loaded.cells[0]) / "result.json"
    result = json.loads(path.read_text())
    assert result["probe"]["protocol"] == "standard"
    assert "SGD (Nesterov 0.9) 2 epochs" in result["probe"]["results"]["linear"]["detail"]
    assert "the papers' SGD linear evaluation (Nesterov 0.9, 2 epochs" in _sweep(suite_file, "--output", output,
                                                                                    "--report").output
    # a result written with every probe key spelled out (as before the defaults were left out) still matches
    result["evaluation"]["probe"] |= {"features": "backbone", "validation": False, "test_rotations": []}
    path.write_text(json.dumps(result))
    assert read_result(path.parent, loaded, loaded.cells[0]) is not None
    # and one written when only changed keys were stored, before a key existed, too
    del result["evaluation"]["probe"]["exact_kernel_knn"], result["evaluation"]["probe"]["weight_decay"]
    path.write_text(json.dumps(result))
    assert read_result(path.parent, loaded, loaded.cells[0]) is not None
    # a result stored with every key spelled out refuses a suite whose default for a key now differs
    result["evaluation"]["probe"] |= {"lr": 0.05}
    path.write_text(json.dumps(result))
    with pytest.raises(HsslError, match="finished with other settings"):
        read_result(path.parent, loaded, loaded.cells[0])
