"""scripts/eigenmode_dynamics.py on a short run: the learning rate of each eigenmode is the predictor's
eigenvalue along it for DirectPred and 1 for IsoLoss, as the analysis says."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "eigenmode_dynamics.py"


@pytest.fixture(scope="module")
def dynamics():
    spec = importlib.util.spec_from_file_location("eigenmode_dynamics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mode_learning_rates_follow_the_predictor_for_directpred_and_are_equal_for_isoloss(dynamics, tmp_path):
    runs = {method: [dynamics.run(method, 0, steps=200, record_every=20)] for method in dynamics.METHODS}
    summary = dynamics.summarise(runs)
    assert summary["isoloss"]["rate_by_mode"] == pytest.approx([1.0] * 8, abs=1e-3)
    directpred = summary["directpred"]
    assert directpred["rate_by_mode"] == pytest.approx(directpred["lambda_by_mode"], abs=0.02)
    assert directpred["rate_by_mode"][0] > 1.5 * directpred["rate_by_mode"][-1]  # weak modes learn slower
    dynamics.plot(runs, summary, tmp_path / "dynamics.png")
    assert (tmp_path / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
