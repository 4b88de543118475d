import math

import pytest
import torch

from hssl_cli.data.groups import Group, act_on_fibres, act_on_images
from hssl_cli.data.views import Views
from hssl_cli.evaluate.measures.equivariance import layer_equivariance
from hssl_cli.models.backbones import build_backbone
from hssl_cli.models.equivariant import LayerFactory, build_equivariant_backbone, import_escnn
from hssl_cli.recipe import ModelConfig


def _worst_exact_error(backbone, images, group):
    rows = layer_equivariance(backbone, images, group)
    assert [row["name"] for row in rows][-1] == "lifted (pooled)"
    return max(error for row in rows for label, error in row["errors"].items()
               if group.is_exact(next(e for e in range(group.size) if group.label(e) == label)))


@pytest.mark.parametrize("size", [16, 17, 28])
def test_c4_convnet_is_equivariant_on_every_layer_at_any_image_size(size):
    torch.manual_seed(0)
    backbone = build_equivariant_backbone("e2_convnet", Group.parse("C4"), 1, (3, 4, 5)).eval()
    assert _worst_exact_error(backbone, torch.randn(4, 1, size, size), Group.parse("C4")) < 1e-5


def test_d4_resnet18_is_equivariant_to_rotations_and_flips():
    torch.manual_seed(0)
    group = Group.parse("D4")
    backbone = build_equivariant_backbone("e2_resnet18", group, 3, (1, 2, 2, 2)).eval()
    rows = layer_equivariance(backbone, torch.randn(2, 3, 15, 15), group)
    assert len(rows) == 1 + 1 + 8 + 1  # input, stem, 8 blocks, lifted
    assert len(rows[-1]["errors"]) == group.size
    assert max(error for row in rows for error in row["errors"].values()) < 1e-5


def test_c8_at_45_degrees_is_exact_on_fibres_only_up_to_interpolation():
    torch.manual_seed(0)
    group = Group.parse("C8")
    backbone = build_equivariant_backbone("e2_convnet", group, 1, (4, 4)).eval()
    images = torch.nn.functional.avg_pool2d(torch.randn(4, 1, 33, 33), 5, 1, 2)  # smooth, so interpolation is mild
    lifted = backbone.lifted(images)
    at_90 = backbone.lifted(act_on_images(images, 2, group))
    at_45 = backbone.lifted(act_on_images(images, 1, group))
    assert (at_90 - act_on_fibres(lifted, 2, group)).norm() / lifted.norm() < 1e-5
    error_45 = (at_45 - act_on_fibres(lifted, 1, group)).norm() / lifted.norm()
    assert 1e-4 < error_45 < 0.1


def test_forward_gives_group_pooled_invariant_plain_tensors():
    torch.manual_seed(0)
    group = Group.parse("C4")
    backbone = build_equivariant_backbone("e2_convnet", group, 1, (2, 3)).eval()
    images = torch.randn(5, 1, 16, 16)
    features = backbone(images)
    assert type(features) is torch.Tensor and features.shape == (5, 3) and backbone.feature_dim == 3
    assert torch.equal(features, backbone.lifted(images).amax(dim=1))
    assert backbone.lifted(images).shape == (5, group.size, 3)
    assert torch.allclose(backbone(torch.rot90(images, 1, (-2, -1))), features, atol=1e-5)


def test_export_is_plain_pytorch_with_the_same_outputs():
    torch.manual_seed(0)
    backbone = build_equivariant_backbone("e2_resnet18", Group.parse("C4"), 1, (1, 1, 2, 2))
    backbone(torch.randn(8, 1, 16, 16))  # move the batch-norm statistics away from their initial values
    backbone.eval()
    exported = backbone.export()
    assert not any(type(module).__module__.startswith("escnn") for module in exported.modules())
    images = torch.randn(3, 1, 16, 16)
    assert torch.allclose(exported(images), backbone(images), atol=1e-5)
    assert torch.allclose(exported.lifted(images), backbone.lifted(images), atol=1e-5)


def test_state_dict_holds_weights_and_statistics_only_in_either_mode():
    backbone = build_equivariant_backbone("e2_convnet", Group.parse("C8"), 1, (2, 2))
    train_keys = set(backbone.train().state_dict())
    eval_keys = set(backbone.eval().state_dict())
    assert train_keys == eval_keys
    assert not [key for key in train_keys if key.endswith(("filter", "sampled_basis", "expanded_bias"))]
    assert {key.rsplit(".", 1)[1] for key in train_keys} == {"weights", "weight", "bias", "running_mean",
                                                             "running_var", "num_batches_tracked"}


def test_loading_weights_in_eval_mode_rebuilds_the_cached_filters():
    torch.manual_seed(0)
    source = build_equivariant_backbone("e2_convnet", Group.parse("C4"), 1, (2, 2)).eval()
    torch.manual_seed(1)
    target = build_equivariant_backbone("e2_convnet", Group.parse("C4"), 1, (2, 2)).eval()
    images = torch.randn(2, 1, 12, 12)
    assert not torch.allclose(target(images), source(images))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(images), source(images))


@pytest.mark.parametrize("name", ["C4", "D4", "C8"])
def test_fast_he_initialisation_matches_escnns_variances(name):
    layers = LayerFactory(Group.parse(name), plain=False)
    init = import_escnn().nn.init
    for in_fields, out_fields, kernel, trivial_input in [(3, 2, 3, False), (3, 5, 5, True), (2, 2, 1, False)]:
        conv = layers._r2conv(in_fields, out_fields, kernel, trivial_input)
        expected = init._generalized_he_init_variances(conv.basisexpansion)
        computed = layers._unit_he_std(kernel, trivial_input).repeat(out_fields * in_fields) / math.sqrt(in_fields)
        assert torch.allclose(computed, expected, rtol=1e-6)


def test_structure_removed_twin_has_the_layout_but_not_the_symmetry():
    torch.manual_seed(0)
    group = Group.parse("C4")
    model = ModelConfig(backbone="e2_convnet", group={"name": "C", "order": 4}, widths=[2, 3], projector=[8])
    equivariant, plain = build_backbone(model, 1), build_backbone(model, 1, plain=True)
    assert [name for name, _ in plain.named_children()] == [name for name, _ in equivariant.named_children()]
    assert not any(type(module).__module__.startswith("escnn") for module in plain.modules())
    assert plain.feature_dim == equivariant.feature_dim == 3 and not plain.capabilities.equivariant
    images = torch.randn(4, 1, 16, 16)
    plain.eval()
    assert plain.lifted(images).shape == (4, group.size, 3)
    assert _worst_exact_error(plain, images, group) > 1e-2


def test_plain_backbones_are_still_built_by_name():
    assert build_backbone("small_convnet", 1).feature_dim == 256
    with pytest.raises(ValueError, match="needs model.group"):
        build_backbone("e2_convnet", 1)


@pytest.mark.parametrize("method", [
    "{name: simclr}", "{name: byol, predictor: [16, 8]}", "{name: hssl}", "{name: hssl, pairing: augmented_fibres}",
    "{name: hssl, loss: byol, predictor: [16, 8]}", "{name: invariant_contrastive}", "{name: equivariant_pretext}",
])  # fmt: skip
def test_a_training_step_expands_each_escnn_filter_once_and_eval_reuses_the_cache(method, monkeypatch):
    """escnn rebuilds a convolution's filter from its basis on every training forward; all views of a step
    must share one pass, and eval mode must not rebuild at all."""
    from hssl_cli.methods import build_method
    from hssl_cli.recipe import parse_recipe

    escnn = import_escnn()
    expansions: dict[int, int] = {}
    expand = escnn.nn.R2Conv.expand_parameters

    def counting_expand(self):
        expansions[id(self)] = expansions.get(id(self), 0) + 1
        return expand(self)

    torch.manual_seed(0)
    recipe = parse_recipe("model: {backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], "
                          f"projector: [16, 8]}}\nmethod: {method}\n", "x.yaml")
    model = build_method(recipe, in_channels=1).train()
    convolutions = [module for module in model.modules() if isinstance(module, escnn.nn.R2Conv)]
    images = torch.randn(4, 1, 17, 17, generator=torch.Generator().manual_seed(0))
    consumes = recipe.method.consumes
    views = Views([images + 0.1 * k for k in range(consumes.global_views)], [],
                  original=images if consumes.original else None)
    monkeypatch.setattr(escnn.nn.R2Conv, "expand_parameters", counting_expand)
    model(views, torch.Generator())["loss"].backward()
    assert convolutions and expansions == {id(conv): 1 for conv in convolutions}

    model.eval()  # escnn expands once on entering eval mode, then serves the cached filter
    expansions.clear()
    with torch.no_grad():
        model.backbone(images)
        model.backbone(images)
    assert expansions == {}
