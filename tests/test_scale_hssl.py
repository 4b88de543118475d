"""Scale H-SSL (model.scales + method.fibres: scales): the exact composition of the down-scaling, the
lifting's identity z_k(S^j x) = z_(k+j)(x) stage by stage (and its failure for bilinear resizing and for the
structure-removed twin), the level pairs, training, the recipe checks, and `hssl equivariance-check`."""

import dataclasses

import pytest
import torch

from hssl_cli.data.scales import coarsen, downscale, downscale_bilinear, shift_levels
from hssl_cli.data.views import Views
from hssl_cli.errors import RecipeError
from hssl_cli.evaluate.measures.scales import scale_equivariance
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe

SCALES = ("data: {dataset: digits, image_size: 32}\n"
          "model: {backbone: small_convnet, scales: {levels: 3}, projector: [32, 16]}\n")


def _method(method: str = "{name: hssl, fibres: scales}", header: str = SCALES, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(parse_recipe(header + f"method: {method}\n", "x.yaml"), in_channels=1).eval()


def test_average_pooling_composes_exactly_and_bilinear_resizing_does_not():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(downscale(downscale(images, 1), 1), downscale(images, 2), atol=1e-7)
    # the mean of each 2 x 2 block (to float rounding: the two sum in different orders)
    assert torch.allclose(downscale(images, 1)[0, 0, 0, 0], images[0, 0, :2, :2].mean(), rtol=0, atol=1e-7)
    assert (downscale_bilinear(images, 1) - downscale(images, 1)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="divisible by 4"):
        downscale(torch.rand(1, 1, 30, 30), 2)
    lifted = torch.arange(12.0).view(1, 3, 4)  # (B, K, C)
    shifted, filled = shift_levels(lifted, 1)
    assert torch.equal(shifted, lifted[:, 1:]) and filled == slice(0, 2)


def test_the_lifting_is_scale_equivariant_stage_by_stage():
    """z_k(S^j x) = z_(k+j)(x) at every stage and for the pooled fibres, for j = 1, 2 (exact: average pooling);
    bilinear resizing to the same size is no S^j; the unshared twin (structure removed) has no such identity."""
    method = _method()
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        lifted = method.backbone.lifted(images)
        assert lifted.shape == (4, 3, 256)
        assert torch.allclose(method.backbone.lifted(downscale(images, 1))[:, :2], lifted[:, 1:], atol=1e-5)
        report = scale_equivariance(method.backbone, images)
    assert [row["name"] for row in report["layers"]][:3] == ["features.0", "features.1", "features.2"]
    exact = [e["label"] for e in report["elements"] if e["exact"]]
    assert exact == ["x1/2 (average pooling)", "x1/4 (average pooling)"]
    for row in report["layers"]:
        assert all(row["errors"][label] < 1e-5 for label in exact), row
    assert report["layers"][-1]["errors"]["x1/2 (bilinear)"] > 1e-2
    removed = _method("{name: hssl, fibres: scales, structure: removed}")
    assert len(removed.backbone.bases) == 3
    assert not torch.equal(removed.backbone.bases[0].features[0].weight, removed.backbone.bases[1].features[0].weight)
    with torch.no_grad():
        broken = scale_equivariance(removed.backbone, images)
    assert broken["layers"][-1]["errors"]["x1/2 (average pooling)"] > 1e-1
    assert broken["layers"][0]["errors"]["x1/2 (average pooling)"] is None  # full-size maps: sizes differ


def test_level_pairs_are_distinct_and_keep_their_distance():
    generator, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    uniform = _method()
    k1, k2 = uniform.draw(6000, generator, cpu)
    assert (k1 != k2).all() and set(k1.tolist()) == {0, 1, 2} and set(k2.tolist()) == {0, 1, 2}
    assert ((k1 - k2).abs() == 2).any()
    near = _method("{name: hssl, fibres: scales, pairs: {distribution: neighbourhood, max_steps: 1}}")
    k1, k2 = near.draw(6000, generator, cpu)
    assert ((k1 - k2).abs() == 1).all()
    subset = _method("{name: hssl, fibres: scales, pairs: {distribution: subset, elements: [0, 2]}}")
    k1, k2 = subset.draw(100, generator, cpu)
    assert set(k1.tolist()) == {0, 2} and (k1 != k2).all()


@pytest.mark.parametrize("loss", ["nt_xent", "byol"])
def test_scale_fibres_train_and_embed_the_full_size_level(loss):
    extra = ", predictor: [32, 16]" if loss == "byol" else ""
    method = _method(f"{{name: hssl, fibres: scales, loss: {loss}{extra}}}").train()
    images = torch.randn(8, 1, 32, 32)
    losses = method(Views([images, images.flip(-1)], []), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(p.grad is not None for p in method.backbone.parameters())
    method.eval()
    with torch.no_grad():
        assert torch.allclose(method.embedding(images), method.projector(method.backbone.lifted(images)[:, 0]))
        assert torch.equal(method.backbone(images), method.backbone.lifted(images).amax(dim=1))


def test_coarsening_shows_each_image_at_its_level_at_the_input_size():
    images = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    coarse = coarsen(images, torch.tensor([0, 1, 2]))
    assert coarse.shape == images.shape and torch.equal(coarse[0], images[0])
    assert torch.allclose(coarse[1, :, :2, :2], images[1, :, :2, :2].mean(dim=(1, 2))[:, None, None].expand(2, 2, 2))
    assert torch.allclose(coarse[2, 0, :4, :4], images[2, 0, :4, :4].mean().expand(4, 4))


def test_the_scale_assl_twin_runs_the_cnn_on_coarsened_full_size_views():
    """pairing: inputs with scale fibres is A-SSL with a scale augmentation at a fixed input size: the pair is
    f(U S^k1 t1 x), f(U S^k2 t2 x) with the lifting's shared CNN f, which is not the lifting's z_k1, z_k2."""
    assl = _method("{name: hssl, fibres: scales, pairing: inputs}").train()
    images, other = torch.randn(6, 1, 32, 32), torch.randn(6, 1, 32, 32)
    k1, k2 = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 2, 0, 2, 0, 1])
    first, second = assl.fibre_pair(assl.backbone, images, other, k1, k2)
    base = assl.backbone.network(0)
    expected = base(torch.cat([coarsen(images, k1), coarsen(other, k2)])).chunk(2)
    assert torch.allclose(first, expected[0], atol=1e-6) and torch.allclose(second, expected[1], atol=1e-6)
    hssl = assl.fibre_pair(assl.backbone, images, other, k1, k2, pairing="augmented_fibres")
    assert not torch.allclose(first, hssl[0], atol=1e-3)
    losses = assl(Views([images, other], []), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


def test_recipe_checks_for_scale_fibres_name_the_keys():
    plain = SCALES.replace(", scales: {levels: 3}", "")
    for header, method, message in (
        (plain, "{name: hssl, fibres: scales}", "set model.scales"),
        (SCALES, "{name: hssl, fibres: scales, pairs: {distribution: subset, elements: [0, 3]}}", "below"),
        (SCALES, "{name: hssl, fibres: scales, pairs: {distribution: neighbourhood, max_steps: 3}}", "at most 2"),
        (SCALES, "{name: hssl, fibres: scales, structure: mixed}", "structure: mixed"),
        (SCALES, "{name: hssl, fibres: scales, pairing: inputs, structure: shuffled}", "would change nothing"),
        (SCALES.replace("32}", "28}"), "{name: simclr}", "divisible by 4"),
        (SCALES.replace("small_convnet", "e2_convnet"), "{name: simclr}", "lifts a plain CNN"),
    ):
        with pytest.raises(RecipeError, match=message):
            parse_recipe(header + f"method: {method}\n", "x.yaml")
    parse_recipe(SCALES + "method: {name: simclr}\n", "x.yaml")  # any method may use the lifted backbone


def test_equivariance_check_reports_and_gates_the_scale_identity(tmp_path, monkeypatch):
    from hssl_cli.evaluate.commands import equivariance_check
    from hssl_cli.evaluate.commands.equivariance_check import check_equivariance

    recipe = tmp_path / "scales.yaml"
    recipe.write_text("name: scales\n" + SCALES + "method: {name: hssl, fibres: scales}\n")
    report = check_equivariance(recipe_path=recipe, samples=6, tolerance=1e-4)
    assert report["scales"]["levels"] == 3 and report["passed"]
    pooled_levels = report["scales"]["layers"][-1]
    assert pooled_levels["gated_elements"] == ["x1/2 (average pooling)", "x1/4 (average pooling)"]
    assert report["translations"] is not None  # the full-size level's map is checked too
    rotations = next(row for row in report["invariance"] if row["name"] == "pooled features")
    assert not rotations["gated"] and "promises no rotation invariance" in rotations["why"]
    removed = tmp_path / "removed.yaml"
    removed.write_text("name: removed\n" + SCALES + "method: {name: hssl, fibres: scales, structure: removed}\n")
    twin = check_equivariance(recipe_path=removed, samples=6, tolerance=1e-4)
    twin_levels = twin["scales"]["layers"][-1]  # K unshared networks on the full-size image: no scale identity
    assert twin["passed"] and not twin_levels["gated"] and twin_levels["errors"]["x1/2 (average pooling)"] > 1e-2
    assert twin_levels["why"] == "measured: the structure-removed twin promises no scale equivariance"
    declared = equivariance_check.capabilities_of  # the twin declared a lifting: the gate catches the broken identity
    monkeypatch.setattr(equivariance_check, "capabilities_of",
                        lambda backbone: dataclasses.replace(declared(backbone), equivariant=True))
    assert not check_equivariance(recipe_path=removed, samples=6, tolerance=1e-4)["passed"]
