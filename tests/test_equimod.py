import json
import math

import pytest
import torch
from torch import nn

from hssl_cli.data.augment import PARAM_NAMES, Augmenter, ViewParams
from hssl_cli.data.statistics import param_vector_stats
from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.engine.train import pretrain
from hssl_cli.evaluate.commands.probe import probe_checkpoint
from hssl_cli.methods.equimod import EquiModBranch
from hssl_cli.recipe import AugmentConfig, EquiModConfig

EQUIMOD = "method.equimod={weight: 1.0, temperature: 0.2, projector: [32, 16], param_embedding: 8}"


class FixedPredictions(nn.Module):
    def __init__(self, predictions: torch.Tensor):
        super().__init__()
        self.predictions = predictions

    def forward(self, original_embedding, params):
        return self.predictions


def test_equimod_loss_and_gain_match_hand_computed_values():
    branch = EquiModBranch(2, EquiModConfig(temperature=1.0, projector=[2]), AugmentConfig(), 16)
    branch.projector = nn.Identity()  # y = f(.) so the embeddings below are the y's
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    y1, y2, y0 = a, b, a  # one image: view 1 points like x0, view 2 is orthogonal to it
    branch.predictor = FixedPredictions(torch.cat([a, b]))  # y_hat_t1 = y_t1, y_hat_t2 = y_t2
    params = [ViewParams.identity(1), ViewParams.identity(1)]
    terms = branch([y1, y2], y0, params, torch.Generator())
    # Rows {y_hat1, y_hat2, y1, y2} = {a, b, a, b}, tau = 1: each row's positive has cos 1, the two
    # others cos 0 -> l = log(1 + 2/e). gain = mean_t cos(y_t, y_hat_t) - cos(y_t, y0) = ((1-1) + (1-0))/2.
    assert terms["loss/equivariance"].item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert terms["equimod/gain"].item() == pytest.approx(0.5)
    total = branch.add_to(torch.tensor(2.0), [y1, y2], y0, params, torch.Generator())
    assert total["loss"].item() == pytest.approx(2.0 + math.log(1 + 2 / math.e), abs=1e-6)


def test_parameter_statistics_come_from_the_augmentation_distribution():
    wide = AugmentConfig(crop_scale=(0.08, 1.0), flip=0.5)
    narrow = AugmentConfig(crop_scale=(0.9, 1.0), flip=0.0)
    wide_mean, wide_std = param_vector_stats(wide, 32)
    narrow_mean, narrow_std = param_vector_stats(narrow, 32)
    flip = PARAM_NAMES.index("flip")
    assert wide_mean[flip] == pytest.approx(0.5, abs=0.02) and narrow_mean[flip] == 0.0
    assert narrow_std[flip] == 1.0  # constant column: standardises to 0 instead of dividing by 0
    width = PARAM_NAMES.index("crop_w")
    assert wide_std[width] > narrow_std[width] * 3
    # standardised draws of the same distribution have mean ~0 and std ~1
    augmenter = Augmenter(wide, 32, torch.full((1,), 0.5), torch.full((1,), 0.5))
    vectors = augmenter.sample(20000, torch.Generator().manual_seed(5), "cpu").as_vector()
    standardized = (vectors - wide_mean) / wide_std
    assert standardized[:, width].mean().abs() < 0.05 and standardized[:, width].std() == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_permuted_parameters_change_nothing_but_the_order_of_the_parameter_vectors(tiny_recipe, method):
    """The ablation that removes only the equivariance: same weights (same seed), same passes and loss; its
    loss equals EquiMod's on the same views with each view's parameter rows permuted by the permutation
    drawn from the step's generator, and differs from EquiMod's on the parameters as drawn."""
    from hssl_cli.data.views import Views
    from hssl_cli.methods import build_method

    overrides = [] if method == "simclr" else ["method={name: byol, predictor: [64, 32]}"]
    recipes = {params: tiny_recipe(*overrides, EQUIMOD.replace("}", f", params: {params}}}"))
               for params in ("matched", "permuted")}
    models = {}
    for params, recipe in recipes.items():
        torch.manual_seed(0)
        models[params] = build_method(recipe, in_channels=1).eval()
    assert all(torch.equal(a, b) for a, b in zip(models["matched"].state_dict().values(),
                                                 models["permuted"].state_dict().values(), strict=True))
    draw = torch.Generator().manual_seed(3)
    images = [torch.randn(16, 1, 16, 16, generator=draw) for _ in range(3)]
    augmenter = Augmenter(AugmentConfig(), 16, torch.full((1,), 0.5), torch.full((1,), 0.5))
    params = [augmenter.sample(16, draw, "cpu") for _ in range(2)]
    views = Views(images[:2], params, original=images[2])
    with torch.no_grad():
        permuted = models["permuted"](views, torch.Generator().manual_seed(7))
        replay = torch.Generator().manual_seed(7)
        orders = [torch.randperm(16, generator=replay) for _ in range(2)]
        reordered = [ViewParams.from_vector(p.as_vector()[order]) for p, order in zip(params, orders, strict=True)]
        by_hand = models["matched"](Views(images[:2], reordered, original=images[2]), torch.Generator())
        matched = models["matched"](views, torch.Generator())
    for name in ("loss", "loss/equivariance", "equimod/gain", "loss/invariance"):
        assert torch.allclose(permuted[name], by_hand[name], atol=1e-6), name
    assert torch.allclose(permuted["loss/invariance"], matched["loss/invariance"], atol=1e-6)
    assert abs(permuted["loss/equivariance"].item() - matched["loss/equivariance"].item()) > 1e-4


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_equimod_trains_logs_its_gain_and_probes(tmp_path, tiny_recipe, method):
    overrides = [] if method == "simclr" else ["method={name: byol, predictor: [64, 32]}"]
    recipe = tiny_recipe(*overrides, EQUIMOD, "train.epochs=1")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "equimod/gain" in row]
    assert logged and all(math.isfinite(row["equimod/gain"]) for row in logged)
    assert all(row["loss"] == pytest.approx(row["loss/invariance"] + row["loss/equivariance"], rel=1e-5)
               for row in logged)
    checkpoint = load_checkpoint(result.checkpoint)
    assert any(key.startswith("equimod.") for key in checkpoint.tensors)
    report = probe_checkpoint(result.checkpoint, device_name="cpu", progress=False)
    assert report["results"]["linear"]["top1"] > 50
