import re
from pathlib import Path

import pytest

from hssl_cli.errors import RecipeError
from hssl_cli.recipe import BYOLConfig, changed_keys, load_recipe, parse_recipe, recipe_to_yaml

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_defaults_fill_every_section():
    recipe = parse_recipe("name: x\n", "x.yaml")
    assert recipe.method.name == "simclr" and recipe.method.temperature == 0.5
    assert recipe.augment.crop_scale == (0.2, 1.0)
    assert recipe.data.dataset == "digits"


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\noptim:\n  name: sgd\n  lrr: 0.1\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == f"{path}:4: unknown key 'optim.lrr'; did you mean 'optim.lr'?"


def test_unknown_key_inside_method_uses_that_methods_schema():
    with pytest.raises(RecipeError, match=r"x.yaml:3: unknown key 'method.ema_strat'; did you mean 'method.ema_start'"):
        parse_recipe("model: {projector: [8]}\nmethod:\n  ema_strat: 0.9\n  name: byol\n  predictor: [8]\n", "x.yaml")


def test_wrong_type_and_out_of_range_values_are_rejected_with_the_key():
    with pytest.raises(RecipeError, match=r"x.yaml:1: train.epochs: .*greater than or equal to 0 \(got -1\)"):
        parse_recipe("train: {epochs: -1}", "x.yaml")
    with pytest.raises(RecipeError, match=r"x.yaml:2: optim.lr: .*valid number"):
        parse_recipe("optim:\n  lr: fast\n", "x.yaml")
    with pytest.raises(RecipeError, match=r"augment.crop_scale: crop_scale must satisfy"):
        parse_recipe("augment: {crop_scale: [0.9, 0.1]}", "x.yaml")


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(RecipeError, match=r"x.yaml:3: YAML syntax error: .*flow sequence on line 2\)"):
        parse_recipe("a: 1\nb: [1, 2\nc: 3\n", "x.yaml")


def test_set_overrides_are_typed_through_the_schema():
    recipe = parse_recipe("name: x\n", "x.yaml", overrides=["optim.lr=0.25", "augment.crop_scale=[0.5, 1]",
                                                             "train.compile=true"])
    assert recipe.optim.lr == 0.25 and recipe.augment.crop_scale == (0.5, 1.0) and recipe.train.compile is True
    with pytest.raises(RecipeError, match=r"--set optim.lrr=1: unknown key 'optim.lrr'; did you mean 'optim.lr'"):
        parse_recipe("name: x\n", "x.yaml", overrides=["optim.lrr=1"])
    with pytest.raises(RecipeError, match=r"--set train.epochs=many: train.epochs"):
        parse_recipe("name: x\n", "x.yaml", overrides=["train.epochs=many"])
    with pytest.raises(RecipeError, match=r"expected key.sub=value"):
        parse_recipe("name: x\n", "x.yaml", overrides=["optim.lr"])


def test_set_can_switch_the_method_and_its_schema():
    recipe = parse_recipe("model: {projector: [16]}\n", "x.yaml",
                          overrides=["method.name=byol", "method.predictor=[32, 16]"])
    assert isinstance(recipe.method, BYOLConfig)


def test_cross_section_checks_name_both_keys():
    with pytest.raises(RecipeError, match="method.predictor must end in the projector's width 64"):
        parse_recipe("model: {projector: [64]}\nmethod: {name: byol, predictor: [64, 128]}", "x.yaml")
    with pytest.raises(RecipeError, match="data.root is required for dataset 'mnist'"):
        parse_recipe("data: {dataset: mnist}", "x.yaml")


def test_resolved_yaml_round_trips_and_diffs_list_changed_keys():
    recipe = parse_recipe("name: x\nmethod: {name: vicreg}\n", "x.yaml")
    again = parse_recipe(recipe_to_yaml(recipe), "stored")
    assert again == recipe
    changed = parse_recipe("name: x\nmethod: {name: vicreg, eps: 0.1}\noptim: {lr: 1.0}\n", "x.yaml")
    assert changed_keys(recipe, changed) == ["method.eps", "optim.lr"]


def test_a_binary_or_huge_file_is_a_one_line_recipe_error(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\n\xff\xfe\x00")
    with pytest.raises(RecipeError, match=r"binary.yaml: not UTF-8 text \(byte 8\)"):
        load_recipe(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * 2_000_000)
    with pytest.raises(RecipeError, match="larger than 1,000,000 bytes"):
        load_recipe(huge)


def test_loss_variant_is_the_loss_a_method_offers_a_choice_of():
    assert parse_recipe("method: {name: directpred, loss: iso}", "x.yaml").method.loss_variant == "iso"
    assert parse_recipe("method: {name: directcopy}", "x.yaml").method.loss_variant == "byol"
    hssl = parse_recipe("method: {name: hssl, fibres: positions, loss: vicreg}", "x.yaml").method
    assert hssl.loss_variant == "vicreg"
    for name in ("simclr", "vicreg", "barlow_twins"):
        assert parse_recipe(f"method: {{name: {name}}}", "x.yaml").method.loss_variant is None
    assert "loss_variant" not in hssl.model_dump()  # a property, not a recipe key


WIDE = "[60000, 60000, 60000]"


@pytest.mark.parametrize(("text", "message"), [
    ("model: {projector: [60000]}\nmethod: {name: byol, predictor: " + WIDE + "}",
     "method.predictor: layers of widths [60000, 60000, 60000] hold about 40 GiB of weights, more than 8 GiB"),
    ("model: {projector: [60000]}\nmethod: {name: mocov3, predictor: " + WIDE + "}",
     "method.predictor: layers of widths [60000, 60000, 60000] hold about 40 GiB"),
    # H-SSL's predictor is bounded whatever the loss, as before (only loss byol checks its last width)
    ("model: {projector: [60000]}\nmethod: {name: hssl, fibres: positions, predictor: " + WIDE + "}",
     "method.predictor: layers of widths [60000, 60000, 60000] hold about 40 GiB"),
    ("method: {name: simclr, equimod: {projector: [60000, 60000, 128]}}",
     "method.equimod.projector: layers of widths [60000, 60000, 128] hold about 14 GiB of weights, more than 8 GiB; "
     "use narrower layers"),
    ("model: {projector: [128]}\nmethod: {name: byol, predictor: [256, 128], equimod: {projector: [60000, 60000, 8]}}",
     "method.equimod.projector: layers of widths"),
])
def test_a_methods_own_heads_are_bounded_in_memory(text, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(text, "x.yaml")


def test_the_heads_a_method_declares_beside_the_projector():
    byol = parse_recipe("model: {projector: [128]}\nmethod: {name: byol, predictor: [256, 128], "
                        "equimod: {projector: [64, 32]}}", "x.yaml")
    assert byol.method.extra_heads(128, 2048) == {"method.predictor": [128, 256, 128],
                                                  "method.equimod.projector": [2048, 64, 32]}
    assert parse_recipe("method: {name: simclr}", "x.yaml").method.extra_heads(128, 2048) == {}
    assert parse_recipe("method: {name: vicreg}", "x.yaml").method.extra_heads(128, 2048) == {}
    mocov3 = parse_recipe("model: {projector: [256]}\nmethod: {name: mocov3}", "x.yaml").method
    assert mocov3.extra_heads(256, 2048) == {"method.predictor": [256, 4096, 256]}
    assert "extra_heads" not in byol.method.model_dump()
