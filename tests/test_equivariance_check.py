import dataclasses
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
from hssl_cli.sweep.run import flat_metrics

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
        assert row["gated_elements"] == ["rot 0", "rot 90", "rot 180", "rot 270"] and "C4 equivariance" in row["why"]
    pooled, embedding = _invariance(report, "pooled features"), _invariance(report, "embedding")
    assert max(pooled["errors"].values()) <= 1e-5 and pooled["gated"]
    assert embedding["errors"]["rot 90"] > 1e-3  # H-SSL's head reads one fibre: not invariant, and not gated
    assert not embedding["gated"] and embedding["why"].startswith("measured")
    assert pooled["augmentation"] > 1e-2  # crops change the features
    assert report["passed"] and not report["trained"] and report["model_group"] == report["test_group"] == "C4"


def _invariance(report, name):
    return next(row for row in report["invariance"] if row["name"] == name)


def test_a_plain_backbone_promises_no_rotation_invariance_so_its_errors_are_measured(tmp_path):
    recipe = str(_write(tmp_path, PLAIN_RECIPE, "plain"))
    result, report = _check("--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    pooled = _invariance(report, "pooled features")
    assert report["layers"] == [] and report["passed"] and not pooled["gated"]
    assert pooled["errors"]["rot 0"] == 0.0 and pooled["errors"]["rot 90"] > 1e-2  # measured, not hidden
    assert pooled["why"] == "measured: small_convnet promises no rotation invariance (--expect-invariant gates it)"
    assert all(shift["gated"] == shift["exact"] for shift in report["translations"]["shifts"])  # shifts still gated
    table, _ = _check("--recipe", recipe)
    assert table.exit_code == 0 and "small_convnet promises no rotation" in table.output and "passed" in table.output
    evaluations = {"probe": {"results": {}}, "transfer": None, "collapse_report": None, "augmentation_probe": None,
                   "equivariance_check": report}
    metrics = flat_metrics(evaluations, {})  # what a sweep cell records
    assert metrics["equivariance/worst_gated_error"] == report["worst_gated_error"] < 1e-5
    assert metrics["equivariance/pooled_features_invariance"] == max(pooled["errors"].values())


def test_expect_invariant_gates_a_plain_backbones_invariance_and_fails_it(tmp_path):
    recipe = str(_write(tmp_path, PLAIN_RECIPE, "plain"))
    result, report = _check("--recipe", recipe, "--json", "--expect-invariant", "--group", "D4")
    assert result.exit_code == 1
    pooled = _invariance(report, "pooled features")
    assert pooled["gated_elements"] == [element["label"] for element in report["elements"]]  # D4: all exact
    assert not report["passed"] and report["worst_gated_error"] == max(pooled["errors"].values())
    assert pooled["why"] == ("gated at exact elements: --expect-invariant "
                             "(small_convnet promises no rotation invariance)")
    table, _ = _check("--recipe", recipe, "--expect-invariant")
    assert table.exit_code == 1 and "failed" in table.output


def test_a_backbone_that_claims_a_group_it_does_not_have_fails_its_gate(tmp_path, monkeypatch):
    from hssl_cli.evaluate.commands import equivariance_check

    removed = _write(tmp_path, C4_RECIPE.replace("method: {name: hssl}", "method: {name: hssl, structure: removed}"),
                     "removed")
    result, report = _check("--recipe", str(removed), "--json")  # the twin: the layout, no promise, passes
    assert result.exit_code == 0, result.output
    pooled = _invariance(report, "pooled features")
    assert report["layers"] == [] and not pooled["gated"] and pooled["errors"]["rot 90"] > 1e-2
    assert pooled["why"].startswith("measured: the structure-removed twin of the C4 e2_convnet")
    declared = equivariance_check.capabilities_of
    monkeypatch.setattr(equivariance_check, "capabilities_of",  # the twin declared equivariant: a broken e2 model
                        lambda backbone: dataclasses.replace(declared(backbone), equivariant=True))
    result, report = _check("--recipe", str(removed), "--json")
    assert result.exit_code == 1 and not report["passed"]
    assert report["layers"][1]["gated_elements"] == ["rot 0", "rot 90", "rot 180", "rot 270"]
    assert report["layers"][1]["errors"]["rot 90"] > 1e-2 and report["worst_gated_error"] > 1e-2


def test_trained_checkpoint_stays_equivariant_and_the_table_names_the_verdict(tmp_path):
    run = pretrain(parse_recipe(C4_RECIPE, "c4.yaml"), tmp_path, device_name="cpu")
    table, _ = _check(str(run.checkpoint), "--group", "C8")
    assert table.exit_code == 0, table.output
    assert "passed" in table.output and "lifted (pooled)" in table.output
    _, report = _check(str(run.checkpoint), "--group", "C8", "--json")
    assert report["trained"] and report["passed"]
    # C8's 45 degrees interpolate: measured and shown, not gated; the C4 layers are not compared at 45
    pooled = _invariance(report, "pooled features")
    assert pooled["errors"]["rot 45"] > 1e-3 and "rot 45" not in pooled["gated_elements"]
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
    for option in ("--recipe", "--group", "--expect-invariant", "--samples", "--tolerance", "--json", "--data-root",
                   "--device"):
        assert option in done.stdout
    for kind in ("rotations/flips", "Translations", "Scale levels", "translations:", "scales:"):
        assert kind in done.stdout


@pytest.mark.parametrize("bad", ["SO2", "X4"])
def test_bad_group_is_a_user_error(tmp_path, bad):
    result, _ = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--group", bad)
    assert result.exit_code == 2 and "C<N> or D<N>" in result.output


def test_translation_rows_of_a_cnn_map_are_exact_at_its_stride_and_interpolated_between(tmp_path):
    result, report = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--json", "--group", "C1")
    assert result.exit_code == 0, result.output
    translations = report["translations"]
    assert translations["stride"] == 8 and translations["positions"] > 0 and translations["reduced"] is None
    exact = [shift for shift in translations["shifts"] if shift["exact"]]
    half = [shift for shift in translations["shifts"] if not shift["exact"]]
    assert len(exact) == 4 and max(shift["error"] for shift in exact) < 1e-5 and all(s["gated"] for s in exact)
    assert min(shift["error"] for shift in half) > 1e-3  # half a cell: no exact move, shown and not gated
    assert not any(shift["gated"] for shift in half)
    assert report["passed"] and report["gated_errors"] == 4  # the four exact shifts; no rotation is promised
    table, _ = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--group", "C1")
    assert "moves the map by" in table.output and "(0.5, 0) cells (interpolated)" in table.output


def test_a_backbone_without_a_map_has_no_translation_rows():
    import torch

    from hssl_cli.evaluate.commands.equivariance_check import translation_rows
    from hssl_cli.models.capabilities import BackboneCapabilities

    backbone = torch.nn.Flatten()
    backbone.capabilities = BackboneCapabilities()  # pooled features only
    assert translation_rows(backbone, torch.zeros(2, 1, 8, 8)) is None


def test_images_wider_than_96_px_are_checked_on_their_centre_and_the_result_says_so():
    import torch

    from hssl_cli.evaluate.measures.translation import MAX_CANVAS, translation_equivariance
    from hssl_cli.models.backbones import SmallConvNet

    torch.manual_seed(0)
    backbone = SmallConvNet(in_channels=1, widths=(2, 3, 3, 3)).eval()
    large = translation_equivariance(backbone, torch.randn(2, 1, 512, 512))
    assert large["image_size"] == 512 and large["content"] == 96 and large["canvas"] <= MAX_CANVAS
    assert large["reduced"] == ("on the 96-px centre of each 512-px image: whole images would need a canvas "
                                "1,536 px wide or more")
    assert max(shift["error"] for shift in large["shifts"] if shift["exact"]) < 1e-5
    normal = translation_equivariance(backbone, torch.randn(2, 1, 96, 96))
    assert normal["content"] == normal["image_size"] == 96 and normal["reduced"] is None


def test_the_stride_is_read_from_how_the_map_grows_not_from_a_rounded_size_ratio():
    import torch

    from hssl_cli.evaluate.measures.translation import map_stride, translation_equivariance
    from hssl_cli.models.backbones import SmallConvNet
    from hssl_cli.models.capabilities import BackboneCapabilities

    torch.manual_seed(0)
    backbone = SmallConvNet(in_channels=1, widths=(2, 3, 3, 3)).eval()  # three stride-2 stages: stride 8
    images = torch.randn(2, 1, 28, 28)  # a 4-cell map: 28 // 4 would say 7, and 7-px shifts are no whole cells
    assert map_stride(backbone, images) == 8
    result = translation_equivariance(backbone, images)
    assert result["stride"] == 8 and max(shift["error"] for shift in result["shifts"] if shift["exact"]) < 1e-5
    strided = torch.nn.Module()  # one stride-3 convolution: 3 does not divide 64, so no stride is read
    strided.features = torch.nn.Conv2d(1, 2, 3, stride=3)
    strided.capabilities = BackboneCapabilities(spatial_map="features")
    assert map_stride(strided, images) is None
    skipped = {"skipped": "the last map's stride could not be read (not a divisor of 64 px, or the backbone refuses "
                          "other input sizes)"}
    assert translation_equivariance(strided, images) == skipped

    class OneSize(torch.nn.Conv2d):  # a map only at the size it was built for, as a timm transformer's
        def forward(self, images):
            assert images.shape[-1] == 28, f"Input height ({images.shape[-1]}) doesn't match model (28)"
            return super().forward(images)

    sized = torch.nn.Module()
    sized.features = OneSize(1, 2, 4, stride=4)
    sized.capabilities = BackboneCapabilities(spatial_map="features")
    assert map_stride(sized, images) is None and translation_equivariance(sized, images) == skipped


def test_a_nan_gated_error_fails_the_check_wherever_it_comes(tmp_path, monkeypatch):
    from hssl_cli.evaluate.commands import equivariance_check

    monkeypatch.setattr(equivariance_check, "_gated_errors", lambda *rows: [1e-7, float("nan"), 1e-8])
    result, report = _check("--recipe", str(_write(tmp_path, PLAIN_RECIPE, "plain")), "--json")
    assert result.exit_code == 1 and report["passed"] is False and report["worst_gated_error"] != 0


def test_the_memory_budget_bounds_the_images_checked_at_once_and_says_so(tmp_path, monkeypatch):
    from hssl_cli.evaluate import forward_memory

    recipe = str(_write(tmp_path, PLAIN_RECIPE, "plain"))
    _, full = _check("--recipe", recipe, "--json")
    assert full["samples"] == 16 and full["samples_reduced"] is None
    measured = {}
    real = forward_memory.forward_bytes
    monkeypatch.setattr(forward_memory, "forward_bytes", lambda *args: measured.setdefault("bytes", real(*args)))
    _check("--recipe", recipe, "--json")
    monkeypatch.setattr(forward_memory, "memory_budget", lambda device: (3 * measured["bytes"], "a test budget"))
    result, small = _check("--recipe", recipe, "--json")
    assert result.exit_code == 0 and small["samples"] == 3
    assert small["samples_reduced"] == "--samples 16 reduced to 3 by the memory budget"
