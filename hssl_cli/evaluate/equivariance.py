"""`hssl equivariance-check`: does a model have the symmetry it claims, layer by layer?

For a test group T (C_N or D_N acting on images, data/groups.py) and a batch x of test images:
- equivariance of every layer of an equivariant backbone: ||f_l(T_g x) - L_g f_l(x)|| / ||f_l(x)||,
  where L_g moves the map on its grid and permutes the fibres of each regular field, plus the same for
  the spatially pooled lifted features (pure fibre permutation, meaningful for every angle);
- translation equivariance of the last spatial map of any convolutional backbone (evaluate/translation.py):
  shifts by multiples of its stride are exact, half-stride shifts interpolated;
- scale equivariance of a multi-scale lifting (model.scales, evaluate/scales.py), stage by stage: down-scaling
  by average pooling is exact, by bilinear resizing interpolated;
- invariance of the pooled features f(x) and of the embedding, for any backbone:
  ||f(T_g x) - f(x)|| / ||f(x)||, and the same under one draw of the recipe's augmentations.
Norms are Frobenius norms over the whole batch. Elements that are multiples of 90 degrees (and flips)
act on the pixel grid exactly; the others interpolate, so their errors measure the network and the
interpolation together: they are reported, while only exact elements are gated against the tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hssl_cli.data.groups import Group, act_on_feature_maps, act_on_fibres, act_on_images
from hssl_cli.errors import HsslError
from hssl_cli.models.capabilities import capabilities_of
from hssl_cli.recipe import Recipe

DEFAULT_TEST_GROUP = "C4"
TRANSLATION_SAMPLES = 8  # images on the (large) canvases of the translation check


@dataclass
class CheckedModel:
    method: nn.Module  # eval mode, gradients off
    recipe: Recipe
    mean: torch.Tensor
    std: torch.Tensor
    source: str
    trained: bool


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


def _translations(backbone: nn.Module, images: torch.Tensor) -> dict | None:
    """The last map's translation equivariance (evaluate/translation.py), or None without a spatial map."""
    from hssl_cli.evaluate.translation import translation_equivariance

    try:
        return translation_equivariance(backbone, images)
    except HsslError:  # no spatial map (feature_map names why): nothing to measure
        return None


def load_checked_model(checkpoint: Path | None, recipe_path: Path | None, device: torch.device,
                       overrides: list[str] | None = None, verify: bool = True) -> CheckedModel:
    """A trained model from a checkpoint, or a freshly initialised one from a recipe (no training)."""
    from hssl_cli.engine.checkpoint import load_checkpoint
    from hssl_cli.evaluate.frozen import load_trained_method
    from hssl_cli.methods import build_method

    if (checkpoint is None) == (recipe_path is None):
        raise HsslError("give a checkpoint (CKPT) or --recipe R.yaml, not both or neither")
    if recipe_path is not None:
        from hssl_cli.data.sources import load_split
        from hssl_cli.data.statistics import channel_stats
        from hssl_cli.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides or [])
        mean, std = channel_stats(load_split(recipe.data, recipe.data.test_split).images)
        torch.manual_seed(recipe.seed)
        method = build_method(recipe, in_channels=mean.numel())
        return CheckedModel(_frozen(method, device), recipe, mean.float().to(device), std.float().to(device),
                            str(recipe_path), trained=False)
    stored = load_checkpoint(checkpoint, verify=verify)
    recipe = stored.recipe
    if overrides:
        from hssl_cli.recipe import parse_recipe, recipe_to_yaml

        recipe = parse_recipe(recipe_to_yaml(recipe), f"{stored.path} (stored recipe)", overrides)
    trained = load_trained_method(stored, device)
    return CheckedModel(trained.method, recipe, trained.mean, trained.std, str(stored.path), trained=True)


def _frozen(method: nn.Module, device: torch.device) -> nn.Module:
    return method.to(device).eval().requires_grad_(False)


def check_equivariance(checkpoint: Path | None = None, recipe_path: Path | None = None, group: str | None = None,
                       samples: int = 64, tolerance: float = 1e-4, device_name: str = "auto",
                       data_root: str | None = None, verify: bool = True) -> dict:
    """Measure everything in the module docstring; `passed` is False when an exact element's error
    (any layer, the lifted features, the pooled features) exceeds `tolerance`."""
    from hssl_cli.data.augment import Augmenter, normalize
    from hssl_cli.data.sources import load_split
    from hssl_cli.engine.device import resolve_device

    if samples < 2:
        raise HsslError(f"--samples {samples}: need at least 2 images")
    started = time.perf_counter()
    device = resolve_device(device_name)
    overrides = [f"data.root={data_root}"] if data_root is not None else []
    checked = load_checked_model(checkpoint, recipe_path, device, overrides, verify)
    recipe, method = checked.recipe, checked.method
    backbone = method.backbone
    capabilities = capabilities_of(backbone)
    model_group = capabilities.group
    default = model_group.name if model_group is not None else DEFAULT_TEST_GROUP
    test_group = Group.parse(group or default)

    split = load_split(recipe.data, recipe.data.test_split)
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))[:samples]
    raw = split.images[order].to(device)
    images = normalize(raw, checked.mean, checked.std)

    layers = layer_equivariance(backbone, images, test_group) if capabilities.equivariant else []
    invariance = {"pooled features": group_invariance(backbone, images, test_group)}
    embed = method.embedding if method.has_embedding else None
    if embed is not None:
        invariance["embedding"] = group_invariance(embed, images, test_group)
    # the first global view's training distribution (views: may override augment:)
    global_views = [view.augment for view in recipe.resolved_views() if view.role == "global"]
    augmenter = Augmenter(global_views[0] if global_views else recipe.augment, recipe.data.image_size,
                          checked.mean, checked.std)
    views = augmenter(raw, torch.Generator(device=device).manual_seed(0))
    augmentations = {}
    with torch.no_grad():
        for name, function in (("pooled features", backbone), ("embedding", embed)):
            if function is not None:
                reference = function(images)
                augmentations[name] = relative_error(function(views), reference, reference)

    translations = _translations(backbone, images[:TRANSLATION_SAMPLES])
    scales = None
    if capabilities.scale_levels is not None:  # a multi-scale lifting
        from hssl_cli.evaluate.scales import scale_equivariance

        scales = scale_equivariance(backbone, images)
    exact = {test_group.label(e) for e in range(test_group.size) if test_group.is_exact(e)}
    # a scale lifting claims no rotation symmetry: its rotation rows are gated only when --group asks for them
    rotations_gated = model_group is not None or group is not None or capabilities.scale_levels is None
    gated = [error for row in [*layers, {"errors": invariance["pooled features"]}]
             for label, error in row["errors"].items() if label in exact] if rotations_gated else []
    if translations is not None:
        gated += [shift["error"] for shift in translations["shifts"] if shift["exact"] and shift["error"] is not None]
    if scales is not None:
        exact_scales = {element["label"] for element in scales["elements"] if element["exact"]}
        gated += [error for row in scales["layers"] for label, error in row["errors"].items()
                  if label in exact_scales and error is not None]
    worst = max(gated, default=0.0)
    return {
        "source": checked.source,
        "trained": checked.trained,
        "method": recipe.method.name,
        "backbone": recipe.model.backbone,
        "equivariant_backbone": bool(layers),
        "model_group": model_group.name if model_group is not None else None,
        "test_group": test_group.name,
        "elements": [{"index": e, "label": test_group.label(e), "exact": test_group.is_exact(e),
                      "in_model_group": model_group is not None
                      and model_element(test_group, e, model_group) is not None}
                     for e in range(test_group.size)],
        "samples": len(order),
        "image_size": recipe.data.image_size,
        "dataset": recipe.data.dataset,
        "layers": layers,
        "invariance": invariance,
        "augmentation_invariance": augmentations,
        "translations": translations,
        "scales": scales,
        "rotations_gated": rotations_gated,
        "tolerance": tolerance,
        "worst_exact_error": worst,
        "passed": worst <= tolerance,
        "seconds": round(time.perf_counter() - started, 2),
    }
