import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.groups import Group
from hssl_cli.engine.train import pretrain
from hssl_cli.evaluate.measures.equivariance import model_element
from hssl_cli.recipe import parse_recipe

runner = CliRunner()

C4_RECIPE = """
name: c4
data: {dataset: digits, image_size: 16}
augment: {crop_scale: [0.5, 1.0], flip: 0.0, grayscale: 0.0, color_jitter: {p: 0.0}}
model: {backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 4], projector: [16, 8]}
method: {name: hssl}
optim: {name: adamw, lr: 2.0e-3, warmup_epochs: 0}
train: {epochs: 1, batch_size: 256, log_every: 5, diagnostics_every: 0}
"""
PLAIN_RECIPE = """
name: plain
data: {dataset: digits, image_size: 16}
model: {backbone: small_convnet, projector: [16, 8]}
method: {name: simclr}
"""


def _write(tmp_path, text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _check(*arguments):
    result = runner.invoke(app, ["equivariance-check", *arguments, "--device", "cpu", "--samples", "16"])
    return result, (json.loads(result.stdout) if "--json" in arguments and result.stdout.strip() else None)


def test_untrained_c4_backbone_passes_at_1e_5_on_every_layer(tmp_path):
    result, report = _check("--recipe", str(_write(tmp_path, C4_RECIPE, "c4")), "--json", "--tolerance", "1e-5")
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in report["layers"]] == ["input", "lift", "conv2", "lifted (pooled)"]
    for row in report["layers"]:
        assert set(row["errors"]) == {"rot 0", "rot 90", "rot 180", "rot 270"}
        assert max(row["errors"].values()) <= 1e-5
    assert max(report["invariance"]["pooled features"].values()) <= 1e-5
    assert report["invariance"]["embedding"]["rot 90"] > 1e-3  # H-SSL's head reads one fibre: not invariant
    assert report["augmentation_invariance"]["pooled features"] > 1e-2  # crops change the features
    assert report["passed"] and not report["trained"] and report["model_group"] == report["test_group"] == "C4"


def test_plain_backbone_fails_the_gate_with_exit_code_1(tmp_path):
    result, report = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--json")
    assert result.exit_code == 1
    assert report["layers"] == [] and not report["passed"]
    assert report["invariance"]["pooled features"]["rot 0"] == 0.0
    assert report["invariance"]["pooled features"]["rot 90"] > 1e-2


def test_trained_checkpoint_stays_equivariant_and_the_table_names_the_verdict(tmp_path):
    run = pretrain(parse_recipe(C4_RECIPE, "c4.yaml"), tmp_path, device_name="cpu")
    table, _ = _check(str(run.checkpoint), "--group", "C8")
    assert table.exit_code == 0, table.output
    assert "passed" in table.output and "lifted (pooled)" in table.output
    _, report = _check(str(run.checkpoint), "--group", "C8", "--json")
    assert report["trained"] and report["passed"]
    # C8's 45 degrees interpolate: measured and shown, not gated; the C4 layers are not compared at 45
    assert report["invariance"]["pooled features"]["rot 45"] > 1e-3
    assert "rot 45" not in report["layers"][1]["errors"] and report["layers"][1]["errors"]["rot 90"] < 1e-5


def test_elements_outside_the_model_group_are_not_compared_layerwise():
    c8, d4 = Group.parse("C8"), Group.parse("D4")
    assert model_element(d4, 1, c8) == 2  # 90 degrees is two steps of C8
    assert model_element(d4, 4, c8) is None  # C8 has no flips
    assert model_element(c8, 1, Group.parse("C4")) is None  # nor C4 45 degrees


def test_checkpoint_or_recipe_but_not_both(tmp_path):
    recipe = str(_write(tmp_path, PLAIN_RECIPE, "plain"))
    for arguments in ([], ["some.safetensors", "--recipe", recipe]):
        result, _ = _check(*arguments)
        assert result.exit_code == 2 and "give a checkpoint (CKPT) or --recipe" in result.output


def test_help_explains_every_option_without_importing_torch():
    code = ("import sys\nfrom hssl_cli.cli import app\ntry:\n    app(['equivariance-check', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, 'escnn' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stderr
    for option in ("--recipe", "--group", "--samples", "--tolerance", "--json", "--data-root", "--device"):
        assert option in done.stdout


@pytest.mark.parametrize("bad", ["SO2", "X4"])
def test_bad_group_is_a_user_error(tmp_path, bad):
    result, _ = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--group", bad)
    assert result.exit_code == 2 and "C<N> or D<N>" in result.output


def testtranslation_rows_of_a_cnn_map_are_exact_at_its_stride_and_interpolated_between(tmp_path):
    result, report = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--json", "--group", "C1")
    assert result.exit_code == 0, result.output  # C1: only the identity, so the translations decide the gate
    translations = report["translations"]
    assert translations["stride"] == 8 and translations["positions"] > 0
    exact = [shift for shift in translations["shifts"] if shift["exact"]]
    half = [shift for shift in translations["shifts"] if not shift["exact"]]
    assert len(exact) == 4 and max(shift["error"] for shift in exact) < 1e-5
    assert min(shift["error"] for shift in half) > 1e-3  # half a cell: no exact move, shown and not gated
    assert report["passed"]
    table, _ = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--group", "C1")
    assert "moves the map by" in table.output and "(0.5, 0) cells (interpolated)" in table.output


def test_a_backbone_without_a_map_has_no_translation_rows():
    import torch

    from hssl_cli.evaluate.commands.equivariance_check import translation_rows
    from hssl_cli.models.capabilities import BackboneCapabilities

    backbone = torch.nn.Flatten()
    backbone.capabilities = BackboneCapabilities()  # pooled features only
    assert translation_rows(backbone, torch.zeros(2, 1, 8, 8)) is None
