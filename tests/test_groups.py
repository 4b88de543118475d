import math

import pytest
import torch

from hssl_cli.data.groups import (
    Group,
    act_on_feature_maps,
    act_on_fibres,
    act_on_images,
    disk_mask,
    interpolation_error,
    rotate,
)
from hssl_cli.data.sources import load_split
from hssl_cli.errors import HsslError
from hssl_cli.models.equivariant import import_escnn
from hssl_cli.recipe import DataConfig


def _escnn_group(group: Group):
    escnn = import_escnn()
    space = escnn.gspaces.rot2dOnR2 if group.kind == "C" else escnn.gspaces.flipRot2dOnR2
    return space(N=group.order)


@pytest.mark.parametrize("name", ["C4", "C8", "D4"])
def test_fibre_permutation_is_escnns_regular_representation(name):
    group = Group.parse(name)
    gspace = _escnn_group(group)
    for element, escnn_element in enumerate(gspace.fibergroup.elements):
        matrix = torch.from_numpy(gspace.regular_repr(escnn_element)).round()
        # (L_g z)_h = z_{g^-1 h}: row h of the permutation matrix has its 1 in column g^-1 h
        expected = group.fibre_permutation(torch.tensor([element]))[0]
        assert torch.equal(matrix.argmax(dim=1), expected), (name, element)


@pytest.mark.parametrize("name", ["C4", "D4", "C8"])
def test_exact_elements_act_on_images_like_escnn(name):
    group = Group.parse(name)
    gspace = _escnn_group(group)
    field = import_escnn().nn.FieldType(gspace, [gspace.trivial_repr])
    images = torch.randn(2, 1, 9, 9)
    for element, escnn_element in enumerate(gspace.fibergroup.elements):
        if group.is_exact(element):
            expected = field(images).transform(escnn_element).tensor
            assert torch.equal(act_on_images(images, element, group), expected), group.label(element)


def test_exact_actions_compose_like_the_group():
    group = Group.parse("D4")
    images = torch.randn(2, 3, 8, 8)
    lifted = torch.randn(2, group.size, 5)
    for first in range(group.size):
        for second in range(group.size):
            product = group.compose(first, second)
            assert torch.equal(act_on_images(act_on_images(images, second, group), first, group),
                               act_on_images(images, product, group))
            assert torch.equal(act_on_fibres(act_on_fibres(lifted, second, group), first, group),
                               act_on_fibres(lifted, product, group))
        assert group.compose(first, group.inverse(first)) == 0


def test_per_sample_elements_match_one_element_at_a_time():
    group = Group.parse("D8")
    images = torch.randn(group.size, 2, 12, 12)
    maps = torch.randn(group.size, 3 * group.size, 6, 6)
    elements = torch.arange(group.size)
    batched_images = act_on_images(images, elements, group)
    batched_maps = act_on_feature_maps(maps, elements, group)
    for element in range(group.size):
        one = slice(element, element + 1)
        assert torch.allclose(batched_images[one], act_on_images(images[one], element, group), atol=1e-6)
        assert torch.allclose(batched_maps[one], act_on_feature_maps(maps[one], element, group), atol=1e-6)


def test_interpolated_rotation_by_90_degrees_matches_rot90():
    for size in (9, 10):
        images = torch.randn(2, 1, size, size)
        rotated = rotate(images, torch.full((2,), math.pi / 2))
        assert torch.allclose(rotated, torch.rot90(images, 1, (-2, -1)), atol=1e-5)


def test_interpolation_error_is_zero_when_exact_and_as_documented_at_45_degrees():
    group = Group.parse("C8")
    digits = load_split(DataConfig(dataset="digits", image_size=16), "test").images.float() / 255
    assert interpolation_error(digits, group, 2) == 0.0
    # documented in data/groups.py: 0.07 on 16x16 digits (round trip through 45 degrees)
    assert 0.04 < interpolation_error(digits, group, 1) < 0.1


def test_disk_mask_is_invariant_under_the_exact_elements():
    mask = disk_mask(11)[None, None]
    group = Group.parse("D4")
    assert all(torch.equal(act_on_images(mask, element, group), mask) for element in range(group.size))
    assert mask[0, 0, 0, 0] == 0 and mask[0, 0, 5, 5] == 1


def test_random_rotation_is_fixed_per_image_and_differs_between_splits():
    rotated = DataConfig(dataset="digits", image_size=16, random_rotation=True)
    first, again = load_split(rotated, "train"), load_split(rotated, "train")
    upright = load_split(DataConfig(dataset="digits", image_size=16), "train")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, upright.labels)
    changed = (first.images.float() - upright.images.float()).abs().flatten(1).amax(dim=1) > 0
    assert changed.float().mean() > 0.95
    test = load_split(rotated, "test")
    assert test.images.shape[1:] == first.images.shape[1:] and test.images.dtype == torch.uint8


def test_group_names_are_validated():
    assert Group.parse("d4") == Group("D", 4) and Group("D", 4).size == 8
    with pytest.raises(HsslError, match="expected C<N> or D<N>"):
        Group.parse("SO2")
    assert Group.parse("C8").label(9 - 8) == "rot 45" and Group.parse("D4").label(5) == "flip+rot 90"
