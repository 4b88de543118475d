"""Translation H-SSL (method.fibres: positions): the identity it rests on (a CNN's map commutes with shifts by
its stride, away from the borders), the pairs over the map's grid, the structure-removed ablation, and
roto-translation fibres on an e2_* backbone."""

import pytest
import torch

from hssl_cli.data.views import Views
from hssl_cli.errors import HsslError, RecipeError
from hssl_cli.methods import build_method
from hssl_cli.methods.fibres import count_period, draw_position_pairs, grid_neighbours
from hssl_cli.models.backbones import build_backbone
from hssl_cli.models.spatial import feature_map
from hssl_cli.recipe import parse_recipe

SMALL = "data: {dataset: digits, image_size: 32}\nmodel: {backbone: small_convnet, projector: [32, 16]}\n"
C4 = ("data: {dataset: digits, image_size: 16}\nmodel: {backbone: e2_convnet, group: {name: C, order: 4}, "
      "widths: [2, 3], projector: [16, 8]}\n")


def _method(method: str, header: str = SMALL, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(parse_recipe(header + f"method: {method}\n", "x.yaml"), in_channels=1)


@pytest.mark.parametrize(("backbone", "size", "layer", "stride", "interior"), [
    ("small_convnet", 64, "last", 8, slice(2, 7)),
    ("resnet18_cifar", 96, "layer3", 4, slice(8, 18)),
])
def test_a_shift_by_the_stride_moves_the_map_by_one_cell_away_from_the_borders(backbone, size, layer, stride,
                                                                               interior):
    """z_p(T_s x) = z_{p - s/stride}(x): exact (to float rounding) where the receptive field stays inside the
    image; at the borders zero padding breaks it, and a shift by half the stride is no cell shift at all."""
    torch.manual_seed(0)
    network = build_backbone(backbone, in_channels=3).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        original = feature_map(network, images, layer)
        shifted = feature_map(network, torch.roll(images, (stride, stride), dims=(2, 3)), layer)
        half = feature_map(network, torch.roll(images, (stride // 2, stride // 2), dims=(2, 3)), layer)
    scale = original.abs().max()
    moved = slice(interior.start - 1, interior.stop - 1)
    inside = (shifted[..., interior, interior] - original[..., moved, moved]).abs().max() / scale
    assert inside < 1e-5
    assert (shifted[..., 1, 1:] - original[..., 0, :-1]).abs().max() / scale > 1e-2  # the wrapped border
    assert (half[..., interior, interior] - original[..., moved, moved]).abs().max() / scale > 1e-2


def test_grid_neighbours_by_hand():
    table, counts = grid_neighbours(3, 3, max_steps=1)
    assert counts.tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    assert table[0, :3].tolist() == [1, 3, 4] and table[4].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    table, counts = grid_neighbours(2, 3, max_steps=None)
    assert counts.tolist() == [5] * 6 and table[2].tolist() == [0, 1, 3, 4, 5]


def test_position_pairs_are_distinct_cover_the_grid_and_keep_their_distance():
    table, counts = grid_neighbours(4, 4, max_steps=1)
    assert count_period(counts) == 120  # lcm of 3, 5 and 8 partners
    p1, p2 = draw_position_pairs(table, counts, count_period(counts), 20000, torch.Generator().manual_seed(0),
                                 torch.device("cpu"))
    assert (p1 != p2).all() and set(p1.tolist()) == set(range(16))
    distance = torch.maximum((p1 // 4 - p2 // 4).abs(), (p1 % 4 - p2 % 4).abs())
    assert distance.max() == 1
    corner = p2[p1 == 0]  # uniform over the corner's three neighbours
    assert torch.bincount(corner, minlength=16)[[1, 4, 5]].min() > 0.3 * len(corner) / 3 * 2.5


@pytest.mark.parametrize("loss", ["nt_xent", "vicreg", "byol"])
def test_position_fibres_train_any_cnn(loss):
    extra = ", predictor: [32, 16]" if loss == "byol" else ""
    method = _method(f"{{name: hssl, fibres: positions, loss: {loss}{extra}}}")
    assert method.projector[0].in_features == 256 and len(method.neighbour_counts) == 16  # 32 px -> 4 x 4 map
    images = torch.randn(8, 1, 32, 32)
    losses = method(Views([images, images.flip(-1)], []), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(p.grad is not None for p in method.backbone.parameters())
    assert method.embedding(images).shape == (8, 16)


def test_position_pairs_are_the_fibres_of_one_pass():
    method = _method("{name: hssl, fibres: positions, pairing: fibres}")
    images = torch.randn(4, 1, 32, 32)
    p1, p2 = torch.tensor([0, 5, 15, 3]), torch.tensor([1, 6, 0, 12])
    first, second = method.fibre_pair(method.backbone, images, images, p1, p2)
    maps = feature_map(method.backbone, images).flatten(2)  # (B, C, 16)
    rows = torch.arange(4)
    assert torch.equal(first, maps[rows, :, p1]) and torch.equal(second, maps[rows, :, p2])


def test_structure_mixed_mixes_positions_so_a_shift_is_no_longer_a_move():
    kept = _method("{name: hssl, fibres: positions}", SMALL.replace("32}", "64}"))
    mixed = _method("{name: hssl, fibres: positions, structure: mixed}", SMALL.replace("32}", "64}"))
    mixed.backbone.load_state_dict(kept.backbone.state_dict())
    assert mixed.mixer.mix.weight.shape == (64, 64)
    images = torch.randn(2, 1, 64, 64)
    shifted = torch.roll(images, (8, 8), dims=(2, 3))
    errors = {}
    with torch.no_grad():
        for name, method in (("kept", kept.eval()), ("mixed", mixed.eval())):
            fibres, moved = method.fibres(method.backbone, images), method.fibres(method.backbone, shifted)
            cell, previous = 3 * 8 + 3, 2 * 8 + 2  # an interior position and the one it moved from
            errors[name] = ((moved[:, cell] - fibres[:, previous]).abs().max() / fibres.abs().max()).item()
    assert errors["kept"] < 1e-5 and errors["mixed"] > 1e-2
    losses = mixed(Views([images, images], []), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert mixed.mixer.mix.weight.grad is not None


def test_structure_removed_shuffles_the_maps_entries_into_pseudo_positions():
    """Pseudo-position q holds C entries of the map drawn from all channels and positions by a fixed
    permutation: the same entries as `kept` (so the pooled features a probe reads are unchanged), but no
    pseudo-position is any position's feature vector, and the permutation survives a checkpoint."""
    kept = _method("{name: hssl, fibres: positions}")
    removed = _method("{name: hssl, fibres: positions, structure: removed}", seed=1)
    removed.backbone.load_state_dict(kept.backbone.state_dict())
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        positions = kept.fibres(kept.backbone, images)  # (B, 16, 256)
        shuffled = removed.fibres(removed.backbone, images)
    assert shuffled.shape == positions.shape
    assert torch.equal(shuffled.flatten(1).sort(dim=1).values, positions.flatten(1).sort(dim=1).values)
    permutation = removed.mixer.permutation
    source_position, source_channel = permutation // 256, permutation % 256
    assert torch.equal(shuffled.flatten(1), positions.flatten(1)[:, permutation])
    per_pseudo_position = source_position.view(16, 256)
    assert all(len(row.unique()) > 8 for row in per_pseudo_position)  # each draws from many positions
    assert (source_channel.view(16, 256) != torch.arange(256)).float().mean() > 0.9  # channels moved too
    assert "mixer.permutation" in removed.state_dict()
    again = _method("{name: hssl, fibres: positions, structure: removed}", seed=2)
    assert not torch.equal(again.mixer.permutation, permutation)
    again.load_state_dict(removed.state_dict())
    assert torch.equal(again.mixer.permutation, permutation)
    losses = removed(Views([images, images], []), torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


def test_roto_translation_fibres_pair_elements_and_positions():
    method = _method("{name: hssl, fibres: group_and_positions}", C4)
    images = torch.randn(6, 1, 16, 16)
    lifted = method.fibres(method.backbone, images)
    positions = len(method.neighbour_counts)
    assert lifted.shape == (6, 4 * positions, 3)
    maps = feature_map(method.backbone, images)  # (B, C |G|, h, w), field-major
    field, element, position = 2, 3, 5
    assert torch.equal(lifted[:, element * positions + position, field],
                       maps.view(6, 3, 4, -1)[:, field, element, position])
    i1, i2 = method.draw(500, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ((i1 // positions) != (i2 // positions)).all() and ((i1 % positions) != (i2 % positions)).all()
    losses = method(Views([images, images], []), torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["loss"])


def test_recipe_checks_for_position_fibres_name_the_keys():
    for method, message in (
        ("{name: hssl, fibres: positions, pairing: inputs}", "method.pairing: inputs with fibres: positions"),
        ("{name: hssl, fibres: positions, pairs: {distribution: subset, elements: [0, 1]}}", "names group elements"),
        ("{name: hssl, fibres: positions, fibres_from: layer3}", "fibres_from: layer3 is a ResNet stage"),
        ("{name: hssl, fibres: group_and_positions}", "model.group is required"),
        ("{name: hssl, structure: mixed}", "structure: mixed mixes map positions"),
    ):
        with pytest.raises(RecipeError, match=message):
            parse_recipe(SMALL + f"method: {method}\n", "x.yaml")
    parse_recipe(SMALL.replace("small_convnet", "resnet18_cifar") + "method: {name: hssl, fibres: positions, "
                 "fibres_from: layer3}\n", "x.yaml")
    with pytest.raises(HsslError, match="has only its last map"):
        build_method(parse_recipe(SMALL.replace("small_convnet", "timm:test_resnet") + "method: {name: hssl, "
                                  "fibres: positions, fibres_from: layer3}\n", "x.yaml"), in_channels=1)
