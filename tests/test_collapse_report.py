import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from hssl_cli.cli import app
from tests.conftest import TINY_RECIPE

runner = CliRunner()

RUNS = {
    # BYOL with neither a predictor nor a target EMA: DirectPred with alpha = 0 (W_P = I) and ema off.
    "collapsing": ["method={name: directpred, alpha: 0, ema: false}"],
    "simclr": [],
    "untrained": ["train.epochs=0"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny digits runs through `hssl pretrain` (8 epochs, diagnostics every 4; one untrained): their
    last.safetensors."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    paths = {}
    for name, overrides in RUNS.items():
        arguments = ["pretrain", str(recipe), "--output", str(root / name), "--device", "cpu",
                     "--set", "train.epochs=8", "--set", "train.diagnostics_every=4"]
        for override in overrides:
            arguments += ["--set", override]
        result = runner.invoke(app, arguments)
        assert result.exit_code == 0, result.output
        paths[name] = next((root / name / "tiny").glob("*/last.safetensors"))
    return paths


def _report(path, *options) -> dict:
    result = runner.invoke(app, ["collapse-report", str(path), "--json", "--device", "cpu", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_verdict_orders_the_three_calibration_cases(checkpoints):
    """Collapsing BYOL (no predictor, no EMA) < untrained network <= healthy SimCLR. The untrained
    network's raw spectrum is dominated by one direction, yet it probes well: it is not collapsed."""
    reports = {name: _report(path) for name, path in checkpoints.items()}
    projector = {name: report["layers"]["projector"] for name, report in reports.items()}
    # measured: standardised effective rank 1.7 / 11.3 / 13.2 of 32 (raw: 1.4 / 10.5 / 12.3)
    assert reports["collapsing"]["verdict"] in ("dimensional collapse", "complete collapse"), projector["collapsing"]
    assert reports["simclr"]["verdict"] == "healthy" and reports["untrained"]["verdict"] == "healthy"
    assert projector["collapsing"]["effective_rank"] < 2.5
    assert projector["collapsing"]["effective_rank"] < projector["simclr"]["effective_rank"] / 3
    assert projector["collapsing"]["effective_rank"] < projector["untrained"]["effective_rank"] / 3
    # the untrained head's outputs all point one way (its bias dominates) but still differ: not complete
    assert projector["untrained"]["normalized_variance"] < 1e-2
    healthy = reports["simclr"]
    assert healthy["samples"] == 360 and healthy["split"] == "test" and healthy["verdict_layer"] == "projector"
    assert set(healthy["layers"]) == {"backbone", "projector"} and healthy["predictor_alignment"] is None
    # DirectPred's predictor is U diag(s^alpha) U^T of the EMA correlation: aligned by construction
    assert reports["collapsing"]["predictor_alignment"]["alignment"] == pytest.approx(1.0, abs=1e-6)


def test_training_logs_the_collapse_diagnostics_every_few_epochs(checkpoints):
    last = {}
    for name in ("collapsing", "simclr"):
        rows = [json.loads(line) for line in (checkpoints[name].parent / "metrics.jsonl").read_text().splitlines()]
        diagnostics = [row for row in rows if "diagnostics/projector/effective_rank" in row]
        assert [row["epoch"] for row in diagnostics] == [4, 8]
        last[name] = diagnostics[-1]
    assert last["collapsing"]["diagnostics/projector/effective_rank"] < 2.5
    assert last["simclr"]["diagnostics/projector/effective_rank"] > 2.5
    assert last["collapsing"]["diagnostics/projector/collapse_level"] >= 1  # dimensional (1) or complete (2)
    assert last["simclr"]["diagnostics/projector/collapse_level"] == 0


def test_table_and_plot(checkpoints, tmp_path):
    plot = tmp_path / "spectrum.png"
    result = runner.invoke(app, ["collapse-report", str(checkpoints["collapsing"]), "--device", "cpu",
                                 "--samples", "200", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "200 digits (scikit-learn)/test images" in result.output and "predictor alignment" in result.output
    assert "verdict (projector):" in result.output and "collapse" in result.output.split("verdict (projector):")[1]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_threshold_changes_the_collapsed_dimension_count(checkpoints):
    strict, loose = (_report(checkpoints["simclr"], "--threshold", value)["layers"]["projector"]
                     for value in ("1e-6", "0.1"))
    assert strict["collapsed_dims"] < loose["collapsed_dims"]


def test_bad_options_are_one_red_line_with_exit_code_2(checkpoints):
    for options, message in ((["--samples", "1"], "--samples 1"), (["--threshold", "2"], "--threshold 2.0")):
        result = runner.invoke(app, ["collapse-report", str(checkpoints["simclr"]), "--device", "cpu", *options])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_help_states_the_verdict_rule_without_importing_torch():
    code = ("import sys\nfrom hssl_cli.cli import app\ntry:\n    app(['collapse-report', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr
    assert "complete collapse when" in done.stdout and "dimensional collapse when" in done.stdout


def test_several_checkpoints_give_a_table_each_one_overlaid_figure_and_a_json_list(checkpoints, tmp_path):
    plot = tmp_path / "spectra.pdf"
    both = [str(checkpoints["simclr"]), str(checkpoints["collapsing"])]
    result = runner.invoke(app, ["collapse-report", *both, "--device", "cpu", "--samples", "200", "--plot", str(plot),
                                 "--label", "SimCLR", "--label", "collapsing", "--separate-axes"])
    assert result.exit_code == 0, result.output
    assert result.output.count("collapse report:") == 2 and plot.read_bytes()[:4] == b"%PDF"
    reports = json.loads(runner.invoke(app, ["collapse-report", *both, "--device", "cpu", "--samples", "200",
                                             "--json"]).output)
    assert [report["checkpoint"] for report in reports] == both
    for options, message in ((["--plot", str(tmp_path / "x.jpg")], "give a .png, .pdf or .svg file"),
                             (["--label", "one"], "--label given 1 time(s) for 2 checkpoint(s)")):
        result = runner.invoke(app, ["collapse-report", *both, "--device", "cpu", *options])
        assert result.exit_code == 2 and message in result.output
