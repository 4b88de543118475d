"""Equivariance and invariance measures of a backbone, for a test group T (C_N or D_N acting on images,
data/groups.py) and a batch x of normalised images:
- every layer of an equivariant backbone: ||f_l(T_g x) - L_g f_l(x)|| / ||f_l(x)||, where L_g moves the map on
  its grid and permutes the fibres of each regular field, plus the same for the spatially pooled lifted features
  (pure fibre permutation, meaningful for every angle);
- invariance of any function of the images: ||f(T_g x) - f(x)|| / ||f(x)||.
Norms are Frobenius norms over the whole batch. Translations (translation.py) and scale levels (scales.py) have
their own modules; `hssl equivariance-check` (commands/equivariance_check.py) gathers them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hssl_cli.data.groups import Group, act_on_feature_maps, act_on_fibres, act_on_images
from hssl_cli.models.capabilities import capabilities_of


def relative_error(measured: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor) -> float:
    """||measured - expected|| / ||reference|| over the whole batch."""
    return float((measured - expected).norm() / reference.norm().clamp_min(1e-12))


def model_element(test_group: Group, element: int, model_group: Group) -> int | None:
    """The model group's element that acts like `element` of the test group, or None (e.g. a flip for C_N,
    or 45 degrees for C4)."""
    flip, steps = test_group.flip_and_steps(element)
    if flip and model_group.kind == "C":
        return None
    model_steps, remainder = divmod(steps * model_group.order, test_group.order)
    return None if remainder else flip * model_group.order + model_steps


@torch.no_grad()
def layer_equivariance(backbone: nn.Module, images: torch.Tensor, test_group: Group) -> list[dict]:
    """Per layer of an equivariant backbone: {name, errors: {element label: relative error}}; elements
    outside the model's group are skipped."""
    model_group = capabilities_of(backbone).needs_group("the layer equivariance check")
    reference = backbone.layer_outputs(images)
    reference_lifted = backbone.lifted(images)
    rows = [{"name": name, "errors": {}} for name, _ in reference] + [{"name": "lifted (pooled)", "errors": {}}]
    for element in range(test_group.size):
        mapped = model_element(test_group, element, model_group)
        if mapped is None:
            continue
        label = test_group.label(element)
        transformed = act_on_images(images, element, test_group)
        outputs = backbone.layer_outputs(transformed)
        for index, ((_, expected_from), (_, measured)) in enumerate(zip(reference, outputs, strict=True)):
            expected = act_on_feature_maps(expected_from, mapped, model_group, regular=index > 0)
            rows[index]["errors"][label] = relative_error(measured, expected, expected_from)
        lifted = backbone.lifted(transformed)
        rows[-1]["errors"][label] = relative_error(lifted, act_on_fibres(reference_lifted, mapped, model_group),
                                                   reference_lifted)
    return rows


@torch.no_grad()
def group_invariance(function: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     test_group: Group) -> dict[str, float]:
    reference = function(images)
    return {test_group.label(element): relative_error(function(act_on_images(images, element, test_group)),
                                                      reference, reference)
            for element in range(test_group.size)}
