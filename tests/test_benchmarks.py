"""The benchmark scripts still run against the engine they measure (untimed, tiny): the GPU check is run
rarely, on a borrowed device, and a script broken by an API change must not be found there."""

import argparse
from pathlib import Path

import pytest
import torch

from tests.test_stream import _folder

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other as top-level modules


def test_throughput_measures_every_pipeline_on_a_tiny_folder(tmp_path, benchmarks):
    import throughput

    args = argparse.Namespace(data=str(_folder(tmp_path, "jpg", count=16)), batch_size=8, steps=1, warmup=1,
                              workers=0, compile=False, backbone="small_convnet")
    recipe = throughput.recipe_for(args)
    device = torch.device("cpu")
    for measure in (throughput.hssl_step, throughput.reference_step, throughput.ceiling_step,
                    throughput.streamed_step, throughput.stream_reader):
        assert measure(args, recipe, device) > 0, measure.__name__


def test_step_proxies_count_ops_of_each_case(benchmarks):
    import step_proxies

    device = torch.device("cpu")
    counts = {}
    for name, case in [
        ("augment reference", step_proxies.augmentation_case(device, 8, reference=True)),
        ("augment fast", step_proxies.augmentation_case(device, 8, reference=False)),
        ("simclr", step_proxies.step_case("{name: simclr}", device, 8, False)),
        ("byol", step_proxies.step_case("{name: byol, predictor: [64, 32]}", device, 8, False)),
        ("directpred", step_proxies.step_case("{name: directpred, predictor_every: 10}", device, 8, False)),
    ]:
        case()  # warm-up, as the script does
        counts[name] = step_proxies.count_ops(case, device)[0]
    assert all(count > 0 for count in counts.values()), counts
    assert counts["augment fast"] < counts["augment reference"]


def test_hssl_throughput_times_both_pairings(benchmarks):
    pytest.importorskip("escnn")
    import hssl_throughput

    from hssl_cli.recipe import load_recipe

    for pairing in ("fibres", "inputs"):
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "hssl_rotmnist_c8.yaml",
                             ["train.batch_size=4", f"method.pairing={pairing}"])
        assert hssl_throughput.seconds_per_step(recipe, torch.device("cpu"), steps=1, warmup=0) > 0


def test_compile_report_finds_no_recompile_in_a_warmed_up_step(benchmarks):
    import compile_report

    row = compile_report.report("simclr")
    assert row["recompiles"] == "none" and row["breaks"] == 0 and row["first_loss_difference"] < 1e-5, row
