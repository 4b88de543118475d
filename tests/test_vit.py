"""The vit backbone (models/vit.py): its recipe keys and their checks, the token grid H-SSL reads (the patch tokens
of a block, class token left out), views of other sizes, and what equivariance-check measures of the grid: exact
under cyclic whole-patch shifts without position embeddings (gated), broken with them (measured)."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from hssl_cli.cli import app
from hssl_cli.data.views import Views
from hssl_cli.errors import RecipeError
from hssl_cli.methods import build_method
from hssl_cli.models.backbones import build_backbone
from hssl_cli.models.spatial import feature_map
from hssl_cli.recipe import ModelConfig, parse_recipe
from tests.conftest import TINY_VIT

runner = CliRunner()

RECIPE = f"""
name: vit
data: {{dataset: digits, image_size: 16}}
augment: {{crop_scale: [1.0, 1.0], flip: 0.0, grayscale: 0.0, color_jitter: {{p: 0.0}}}}
model: {{backbone: vit, vit: {TINY_VIT}, projector: [16, 8]}}
method: {{name: hssl, fibres: positions}}
optim: {{name: adamw, lr: 2.0e-3, warmup_epochs: 0}}
train: {{epochs: 1, batch_size: 64, log_every: 5, diagnostics_every: 0}}
"""


def _vit(position_embedding: str = "none", pool: str = "avg", image_size: int = 16):
    torch.manual_seed(0)
    model = ModelConfig(backbone="vit", vit={"patch_size": 4, "width": 16, "depth": 2, "heads": 2,
                                             "position_embedding": position_embedding, "pool": pool})
    return build_backbone(model, 1, image_size=image_size).eval()


@pytest.mark.parametrize(("override", "message"), [
    ("model.vit.patch_size=5", "model.vit.patch_size=5 must divide data.image_size=16"),
    ("views=[{}, {}, {size: 6}]", "must divide views: size=6"),
    ("model.vit.heads=3", "model.vit.heads=3 must divide model.vit.width=16"),
    ("method.fibres_from=block2", "block2 is a block of a vit; model.backbone vit has blocks block0 .. block1"),
    ("method.fibres_from=layer3", "layer3 is a ResNet stage"),
    ("model.backbone=small_convnet", "model.vit sizes the vit backbone, not 'small_convnet'"),
    ("model.vit={width: 16384, depth: 12, heads: 16}", "model.vit: width 16384 and depth 12 make about 3.9e+10"),
])
def test_recipe_checks_name_the_key_and_the_fix(override, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(RECIPE, "vit.yaml", [override])


def test_block_fibres_are_refused_on_a_cnn():
    with pytest.raises(RecipeError, match="block0 is a block of a vit; model.backbone small_convnet has no blocks"):
        parse_recipe(RECIPE.replace(f", vit: {TINY_VIT}", "").replace("backbone: vit", "backbone: small_convnet"),
                     "cnn.yaml", ["method.fibres_from=block0"])


def test_the_token_grid_is_a_blocks_patch_tokens_without_the_class_token():
    network = _vit(position_embedding="absolute", pool="token")
    images = torch.randn(3, 1, 16, 16)
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, output: outputs.append(output))
             for block in network.blocks]
    with torch.no_grad():
        last, first = feature_map(network, images, "last"), feature_map(network, images, "block0")
    for hook in hooks:
        hook.remove()
    assert last.shape == first.shape == (3, 16, 4, 4)
    tokens_last, tokens_first = outputs[1], outputs[2]  # the "last" call ran blocks 0 and 1, "block0" block 0
    assert tokens_last.shape == (3, 17, 16)  # class token + 16 patch tokens
    assert torch.equal(last, tokens_last[:, 1:].transpose(1, 2).reshape(3, 16, 4, 4))
    assert torch.equal(first, tokens_first[:, 1:].transpose(1, 2).reshape(3, 16, 4, 4))


@pytest.mark.parametrize("position_embedding", ["none", "absolute"])
def test_views_of_any_multiple_of_the_patch_take_the_same_network(position_embedding):
    network = _vit(position_embedding=position_embedding)
    with torch.no_grad():
        assert network(torch.randn(2, 1, 8, 8)).shape == (2, 16)
        assert feature_map(network, torch.randn(2, 1, 24, 24)).shape == (2, 16, 6, 6)


def test_pool_avg_reads_the_mean_patch_token_and_token_the_class_token():
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        averaged, by_token = _vit(pool="avg"), _vit(pool="token")
        assert torch.allclose(averaged(images), averaged.fc_norm(feature_map(averaged, images).mean(dim=(2, 3))),
                              atol=1e-6)
        tokens = by_token.forward_features(images)
        assert torch.equal(by_token(images), tokens[:, 0])


def test_without_position_embeddings_a_cyclic_patch_shift_permutes_the_tokens_exactly():
    """tokens(T_s x) = roll(tokens(x), s / P) for shifts by whole patches; with learned absolute position
    embeddings (made large here, as training makes them) it fails."""
    images = torch.randn(2, 1, 16, 16)
    for position_embedding, exact in (("none", True), ("absolute", False)):
        network = _vit(position_embedding)
        if not exact:
            torch.nn.init.normal_(network.pos_embed, std=1.0)
        with torch.no_grad():
            shifted = feature_map(network, torch.roll(images, (4, -8), dims=(2, 3)))
            expected = torch.roll(feature_map(network, images), (1, -2), dims=(2, 3))
        error = float((shifted - expected).norm() / expected.norm())
        assert (error < 1e-5) if exact else (error > 1e-2)


def _check(tmp_path, recipe: str) -> dict:
    path = tmp_path / "vit.yaml"
    path.write_text(recipe)
    result = runner.invoke(app, ["equivariance-check", "--recipe", str(path), "--device", "cpu", "--samples", "8",
                                 "--json", "--group", "C1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_equivariance_check_gates_the_grid_only_without_position_embeddings(tmp_path):
    report = _check(tmp_path, RECIPE)
    translations = report["translations"]
    assert translations["cyclic"] and translations["stride"] == 4 and translations["grid"] == [4, 4]
    assert all(row["gated"] and row["error"] < 1e-5 for row in translations["shifts"])
    assert report["passed"] and report["gated_errors"] == 4
    positioned = _check(tmp_path, RECIPE.replace("position_embedding: none", "position_embedding: absolute"))
    rows = positioned["translations"]["shifts"]
    assert not any(row["gated"] for row in rows) and min(row["error"] for row in rows) > 1e-3
    assert positioned["passed"] and positioned["gated_errors"] == 0  # nothing promised, nothing failed


def test_hssl_pairs_two_tokens_of_one_pass():
    torch.manual_seed(0)
    method = build_method(parse_recipe(RECIPE, "vit.yaml", ["method.pairing=fibres"]), in_channels=1)
    images = torch.randn(8, 1, 16, 16)
    assert method.fibres(method.backbone, images).shape == (8, 16, 16)  # (B, 4 x 4 tokens, width)
    loss = method(Views(global_views=[], global_params=[], original=images), torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and method.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_hssl_freezes_what_lies_after_its_map_and_nothing_else():
    torch.manual_seed(0)
    method = build_method(parse_recipe(RECIPE, "vit.yaml", ["method.fibres_from=block0"]), in_channels=1)
    frozen = {name for name, p in method.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in method.backbone.named_parameters()
                      if name.startswith(("blocks.1.", "norm.", "fc_norm."))} and "fc_norm.weight" in frozen
    from hssl_cli.models.spatial import layers_after_map

    resnet = build_backbone("resnet18_cifar", 1)
    assert layers_after_map(resnet, "layer3") == [resnet.layer4] and layers_after_map(resnet, "last") == []
