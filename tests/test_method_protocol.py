"""The method protocol: every method name trains from a recipe, draws randomness only from the step's
generator (so a stopped and resumed run ends bit for bit where an uninterrupted one does), and reads the
views its config declares; `views:` gives asymmetric pipelines and multi-crop."""

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.data.sources import load_split
from hssl_cli.data.statistics import channel_stats
from hssl_cli.data.views import build_pipelines, draw_views
from hssl_cli.errors import RecipeError
from hssl_cli.methods import METHODS, build_method
from hssl_cli.recipe import parse_recipe
from tests.conftest import C4_BACKBONE, METHOD_OVERRIDES, TINY_RECIPE, train_stopped_and_resumed

CLOSED_FORM = {"kernel"}  # one solve, no steps: nothing to stop and resume


def test_every_registered_method_has_a_protocol_case():
    assert {name.split("+")[0] for name in METHOD_OVERRIDES} == set(METHODS) - CLOSED_FORM


def _step_inputs(recipe, batch: int = 16):
    images = load_split(recipe.data, "train").images[:batch]
    mean, std = (stat.float() for stat in channel_stats(images))
    return images, build_pipelines(recipe, mean, std), mean, std


@pytest.mark.parametrize("case", sorted(METHOD_OVERRIDES))
def test_a_step_leaves_the_global_rng_alone_and_repeats_from_its_generator(tiny_recipe, case):
    recipe = tiny_recipe(*METHOD_OVERRIDES[case])
    images, pipelines, mean, std = _step_inputs(recipe)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        method = build_method(recipe, in_channels=1)
        global_state = torch.get_rng_state()
        generator = torch.Generator().manual_seed(11)
        views = draw_views(pipelines, images, generator, recipe.method.consumes.original, mean, std)
        losses.append(method(views, generator)["loss"])
        assert torch.equal(torch.get_rng_state(), global_state), "the method drew from torch's global RNG"
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("case", sorted(METHOD_OVERRIDES))
def test_stop_and_resume_is_bit_exact(tmp_path, tiny_recipe, case):
    recipe = tiny_recipe(*METHOD_OVERRIDES[case], "train.epochs=1", "train.batch_size=256", "train.log_every=2",
                         "train.diagnostics_every=0")
    whole, first, second = train_stopped_and_resumed(recipe, tmp_path, stop_step=2)
    assert first.interrupted and first.steps == 2 and second.steps == whole.steps == 5
    assert second.run_dir == first.run_dir  # resumed, not restarted (--resume auto skips unreadable states)
    expected, resumed = load_file(whole.checkpoint), load_file(second.checkpoint)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected), case


def test_views_give_each_view_its_own_size_count_and_augmentation(tiny_recipe):
    recipe = tiny_recipe("views=[{blur: {p: 1.0}}, {blur: {p: 0.0}, solarize: 1.0}, {size: 8, count: 3}]")
    resolved = recipe.resolved_views()
    assert [(view.size, view.count, view.role) for view in resolved] == [(16, 1, "global"), (16, 1, "global"),
                                                                         (8, 3, "local")]
    assert resolved[0].augment.blur.p == 1.0 and resolved[0].augment.blur.sigma == recipe.augment.blur.sigma
    images, pipelines, mean, std = _step_inputs(recipe)
    views = draw_views(pipelines, images, torch.Generator().manual_seed(0), False, mean, std)
    assert [view.shape[-1] for view in views.global_views] == [16, 16]
    assert [view.shape for view in views.local_views] == [(16, 1, 8, 8)] * 3
    first, second = views.global_params
    assert (first.blur_sigma > 0).all() and not (second.blur_sigma > 0).any() and second.solarize.all()
    assert not torch.equal(views.local_views[0], views.local_views[1])  # three different crops


def test_a_recipe_with_views_survives_its_round_trip_through_a_checkpoint(tiny_recipe):
    from hssl_cli.recipe import recipe_to_yaml

    recipe = tiny_recipe(*METHOD_OVERRIDES["simclr+multicrop"])
    assert parse_recipe(recipe_to_yaml(recipe), "stored.yaml") == recipe


def test_without_views_the_pipeline_draws_what_one_augmenter_drew_before(tiny_recipe):
    """Two default views are two calls of one augmenter on one generator, in order (the old protocol)."""
    from hssl_cli.data.augment import Augmenter

    recipe = tiny_recipe()
    images, pipelines, mean, std = _step_inputs(recipe)
    views = draw_views(pipelines, images, torch.Generator().manual_seed(3), False, mean, std)
    augmenter, generator = Augmenter(recipe.augment, 16, mean, std), torch.Generator().manual_seed(3)
    for drawn in views.global_views:
        assert torch.equal(drawn, augmenter(images, generator))


@pytest.mark.parametrize("overrides, message", [
    (["views=[{}]"], "views: method simclr reads 2 global view"),
    ([C4_BACKBONE, "method={name: hssl}", "views=[{}, {}, {size: 8}]"],
     r"method hssl takes no local \(multi-crop\) views, the views list has 1; remove them or use a multi-crop "
     r"method \(simclr, vicreg, barlow_twins, byol, directpred, directcopy, mocov3, dino\)"),
    (["method={name: byol, predictor: [64, 32], equimod: {projector: [32, 16]}}", "views=[{}, {}, {size: 8}]"],
     r"method.equimod takes no local \(multi-crop\) views, the views list has 1; remove them from views: or set "
     r"method.equimod: null"),
    (["method.equimod={projector: [32, 16]}", "views=[{}, {}, {size: 8, count: 2}]"],
     "method.equimod takes no local"),
    (["views=[{}, {}, {blur: {p: 2.0}}]"], r"views.2.blur.p: Input should be less than or equal to 1"),
    (["views=[{}, {}, {blur: {q: 1}}]"], r"views.2.blur.q: Extra inputs are not permitted"),
    (["views=[{}, {sizes: 3}]"], "unknown key 'views.1.sizes'; did you mean 'views.1.size'"),
    (["method={name: kernel, num_samples: 20, embedding_dim: 4}", "views=[{}]"], "method kernel draws its own"),
])  # fmt: skip
def test_views_that_do_not_fit_the_method_are_refused_naming_the_key(tiny_recipe, overrides, message):
    with pytest.raises(RecipeError, match=message):
        tiny_recipe(*overrides)


def test_equivariant_methods_on_a_plain_backbone_are_refused_at_load(tiny_recipe):
    with pytest.raises(RecipeError, match="invariant_contrastive needs an equivariant backbone"):
        tiny_recipe("method={name: invariant_contrastive}")


def test_multicrop_averages_the_pair_loss_over_every_global_other_pair():
    from hssl_cli.losses import info_nce
    from hssl_cli.methods.base import mean_over_view_pairs

    g1, g2, l1, l2 = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0)).unbind()
    loss = mean_over_view_pairs([g1, g2], [l1, l2], lambda a, b: {"loss": info_nce(a, b, 0.5)})["loss"]
    pairs = [(g1, g2), (g1, l1), (g1, l2), (g2, l1), (g2, l2)]
    expected = sum(info_nce(a, b, 0.5) for a, b in pairs) / 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_tiny_recipe_parses_without_torch_views():
    assert parse_recipe(TINY_RECIPE, "tiny.yaml").views is None
