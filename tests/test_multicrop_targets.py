"""Multi-crop for the methods whose online view predicts a target (BYOL, SimSiam, DirectPred/IsoLoss, MoCo v3):
the target network reads only the global views, the online networks every view, and the loss is
(2 / P) sum over the P (online view v, global target i != v) pairs, which two views reduce to today's
symmetrised loss bit for bit. Checked against losses written out pair by pair on a pooling backbone."""

import typing

import pytest
import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine, iso_loss, momentum_contrast
from hssl_cli.methods.base import loss_over_target_pairs
from hssl_cli.methods.byol import BYOL
from hssl_cli.methods.directpred import DirectPred
from hssl_cli.methods.mocov3 import MoCoV3
from hssl_cli.recipe.methods import MULTI_CROP_METHODS, MethodConfig

LOCAL_VIEWS = "views=[{}, {}, {size: 8, count: 2}]"
BATCH, CHANNELS = 6, 3
# the pairs (online view v, global target i) of 2 global views (0, 1) and 2 local ones (2, 3)
PAIRS = [(0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1)]


class MeanPool(nn.Module):
    """f(x) = the mean of each channel: a backbone with no weights that reads any resolution."""

    feature_dim = CHANNELS

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def _views(local_views: int = 2) -> Views:
    draw = torch.Generator().manual_seed(0)
    globals_ = [torch.randn(BATCH, CHANNELS, 16, 16, generator=draw) for _ in range(2)]
    locals_ = [torch.randn(BATCH, CHANNELS, 8, 8, generator=draw) for _ in range(local_views)]
    return Views(globals_, [None, None], locals_, [None] * local_views, None)


def _method(kind, tiny_recipe, method: str):
    torch.manual_seed(0)
    return kind(MeanPool(), tiny_recipe(method, LOCAL_VIEWS)).train()


def _target_reads(method) -> list[tuple[int, ...]]:
    """The shapes the target backbone is called on (by a hook), filled as the method runs."""
    seen: list[tuple[int, ...]] = []
    method.target["backbone"].register_forward_hook(lambda _, inputs, out: seen.append(tuple(inputs[0].shape)))
    return seen


def _online_embeddings(method, views: Views) -> list[torch.Tensor]:
    """z_v = g(f(x_v)) of every view, the global ones first, in one pass of g (as the methods do)."""
    every_view = [*views.global_views, *views.local_views]
    features = torch.cat([method.backbone(images) for images in every_view])
    return list(method.projector(features).chunk(len(every_view)))


def _global_targets(method, views: Views) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(method.target["projector"](method.target["backbone"](torch.cat(views.global_views))).chunk(2))


def test_the_pair_loss_is_twice_the_mean_over_every_view_and_other_global_target():
    online = list(torch.randn(4, BATCH, 5, generator=torch.Generator().manual_seed(1)).unbind())
    targets = online[:2]
    loss = loss_over_target_pairs(online, targets, byol_cosine)
    expected = 2 / 6 * sum(byol_cosine(online[v], targets[i]) for v, i in PAIRS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # two views: the symmetrised loss itself, bit for bit
    two_views = loss_over_target_pairs(online[:2], targets, byol_cosine)
    assert torch.equal(two_views, byol_cosine(online[0], targets[1]) + byol_cosine(online[1], targets[0]))


def test_the_pair_loss_refuses_more_targets_than_views_naming_the_counts():
    with pytest.raises(ValueError, match="G = 3, V = 2"):
        loss_over_target_pairs([torch.ones(2, 3)] * 2, [torch.ones(2, 3)] * 3, byol_cosine)


@pytest.mark.parametrize("ema", [True, False])
def test_byol_and_simsiam_predict_every_other_global_target_from_every_view(tiny_recipe, ema):
    method = _method(BYOL, tiny_recipe, f"method={{name: byol, predictor: [64, 32], ema: {str(ema).lower()}}}")
    seen = _target_reads(method) if ema else []
    views = _views()
    loss = method(views, torch.Generator())["loss"]
    assert seen == ([(2 * BATCH, CHANNELS, 16, 16)] if ema else [])  # the target: the global views only
    z = _online_embeddings(method, views)
    predictions = method.predictor(torch.cat(z)).chunk(4)
    targets = _global_targets(method, views) if ema else [z[0].detach(), z[1].detach()]  # SimSiam: sg(z_i)
    expected = 2 / 6 * sum(byol_cosine(predictions[v], targets[i]) for v, i in PAIRS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss_name, ema", [("byol", True), ("iso", True), ("byol", False), ("iso", False)])
def test_directpred_predicts_every_other_global_target_and_its_correlation_reads_the_global_views(
        tiny_recipe, loss_name, ema):
    method = _method(DirectPred, tiny_recipe, f"method={{name: directpred, loss: {loss_name}, rho: 0.5, "
                                              f"ema: {str(ema).lower()}}}")
    seen = _target_reads(method) if ema else []
    views = _views()
    losses = method(views, torch.Generator())
    assert seen == ([(2 * BATCH, CHANNELS, 16, 16)] if ema else [])
    z = _online_embeddings(method, views)
    # C <- rho C + (1 - rho) z^T z / B from 0, over the global views' z only (B = 2 x batch rows)
    global_z = torch.cat(z[:2]).detach()
    assert torch.allclose(method.predictor.correlation, 0.5 * global_z.T @ global_z / (2 * BATCH), atol=1e-6)
    weight = method.predictor.weight()
    targets = _global_targets(method, views) if ema else [z[0].detach(), z[1].detach()]
    cosine = 2 / 6 * sum(byol_cosine(z[v] @ weight, targets[i]) for v, i in PAIRS)
    if loss_name == "byol":
        assert losses["loss"].item() == pytest.approx(cosine.item(), rel=1e-6)
    else:
        iso = 2 / 6 * sum(iso_loss(z[v], targets[i], weight) for v, i in PAIRS)
        assert losses["loss"].item() == pytest.approx(iso.item(), rel=1e-6)
        assert losses["loss/cosine"].item() == pytest.approx(cosine.item(), rel=1e-6)


def test_mocov3_takes_queries_from_every_view_and_keys_from_the_global_views(tiny_recipe):
    method = _method(MoCoV3, tiny_recipe, "method={name: mocov3, temperature: 0.5, predictor: [64, 32]}")
    seen = _target_reads(method)
    views = _views()
    loss = method(views, torch.Generator())["loss"]
    assert seen == [(2 * BATCH, CHANNELS, 16, 16)]
    queries = method.predictor(torch.cat(_online_embeddings(method, views))).chunk(4)
    keys = _global_targets(method, views)
    expected = 2 / 6 * sum(momentum_contrast(queries[v], keys[i], 0.5) for v, i in PAIRS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("method", [
    "{name: byol, predictor: [64, 32]}", "{name: byol, predictor: [64, 32], ema: false}",
    "{name: directpred, loss: iso, ema: false}", "{name: directcopy}", "{name: mocov3, predictor: [64, 32]}",
])
def test_recipes_give_local_views_to_the_target_methods(tiny_recipe, method):
    assert tiny_recipe(f"method={method}", LOCAL_VIEWS).method.consumes.local_views


def test_the_refusal_of_local_views_names_exactly_the_methods_that_take_them():
    configs = typing.get_args(typing.get_args(MethodConfig)[0])
    taking = {config.model_fields["name"].default for config in configs if config().consumes.local_views}
    assert set(MULTI_CROP_METHODS) == taking and len(MULTI_CROP_METHODS) == len(taking)
