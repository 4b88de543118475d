"""`hssl equivariance-check`: does a model have the symmetry it claims, layer by layer?

For a test group T (C_N or D_N acting on images, data/groups.py) and a batch x of test images:
- equivariance of every layer of an equivariant backbone and of its pooled lifted features
  (measures/equivariance.py);
- translation equivariance of the last spatial map of any convolutional backbone (measures/translation.py):
  shifts by multiples of its stride are exact, half-stride shifts interpolated;
- scale equivariance of a multi-scale lifting (model.scales, measures/scales.py), stage by stage: down-scaling
  by average pooling is exact, by bilinear resizing interpolated;
- invariance of the pooled features f(x) and of the embedding, for any backbone:
  ||f(T_g x) - f(x)|| / ||f(x)||, and the same under one draw of the recipe's augmentations.
Norms are Frobenius norms over the whole batch. Elements that are multiples of 90 degrees (and flips)
act on the pixel grid exactly; the others interpolate, so their errors measure the network and the
interpolation together: they are reported, while only exact elements are gated against the tolerance.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from hssl_cli.data.groups import Group
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.measures.equivariance import group_invariance, layer_equivariance, model_element, relative_error
from hssl_cli.evaluate.measures.scales import scale_equivariance
from hssl_cli.evaluate.opening import EvaluationInputs
from hssl_cli.models.capabilities import BackboneCapabilities, capabilities_of

DEFAULT_TEST_GROUP = "C4"
TRANSLATION_SAMPLES = 8  # images on the (large) canvases of the translation check


def check_equivariance(checkpoint: Path | None = None, recipe_path: Path | None = None, group: str | None = None,
                       samples: int = 64, tolerance: float = 1e-4, device_name: str = "auto",
                       data_root: str | None = None, verify: bool = True) -> dict:
    """Measure everything in the module docstring on a checkpoint or on a recipe's freshly initialised model;
    `passed` is False when an exact element's error (any layer, the lifted features, the pooled features, an
    exact shift, an exact scale level) exceeds `tolerance`."""
    from hssl_cli.data.augment import normalize
    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.opening import open_for_evaluation
    from hssl_cli.evaluate.subsets import fixed_sample

    if (checkpoint is None) == (recipe_path is None):
        raise HsslError("give a checkpoint (CKPT) or --recipe R.yaml, not both or neither")
    if samples < 2:
        raise HsslError(f"--samples {samples}: need at least 2 images")
    started = time.perf_counter()
    opened = open_for_evaluation(checkpoint or recipe_path, resolve_device(device_name), data_root=data_root,
                                 verify=verify, from_recipe=recipe_path is not None)
    backbone = opened.method.backbone
    capabilities = capabilities_of(backbone)
    model_group = capabilities.group
    test_group = Group.parse(group or (model_group.name if model_group is not None else DEFAULT_TEST_GROUP))
    split = opened.read_split(opened.data.test_split)
    raw = split.images[fixed_sample(len(split.labels), samples)].to(opened.trained.mean.device)
    images = normalize(raw, opened.trained.mean, opened.trained.std)

    layers = layer_equivariance(backbone, images, test_group) if capabilities.equivariant else []
    invariance, augmentations = _invariances(opened, raw, images, test_group)
    translations = translation_rows(backbone, images[:TRANSLATION_SAMPLES])
    scales = scale_equivariance(backbone, images) if capabilities.scale_levels is not None else None
    # a scale lifting claims no rotation symmetry: its rotation rows are gated only when --group asks for them
    rotations_gated = model_group is not None or group is not None or capabilities.scale_levels is None
    worst = max(_gated_errors(layers, invariance, translations, scales, test_group, rotations_gated), default=0.0)
    recipe = opened.recipe
    return {
        "source": opened.source,
        "trained": opened.checkpoint is not None,
        "method": recipe.method.name,
        "backbone": recipe.model.backbone,
        "equivariant_backbone": bool(layers),
        "model_group": model_group.name if model_group is not None else None,
        "test_group": test_group.name,
        "elements": _elements(test_group, capabilities),
        "samples": len(raw),
        "image_size": opened.data.image_size,
        "dataset": opened.data.dataset,
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


def _invariances(opened: EvaluationInputs, raw: torch.Tensor, images: torch.Tensor, test_group: Group
                 ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The pooled features' (and the embedding's) invariance under each element of `test_group`, and under one
    draw of the first global view's training augmentation (views: may override augment:)."""
    from hssl_cli.data.augment import Augmenter

    method, recipe = opened.method, opened.recipe
    functions = {"pooled features": method.backbone, "embedding": method.embedding if method.has_embedding else None}
    invariance = {name: group_invariance(function, images, test_group) for name, function in functions.items()
                  if function is not None}
    global_views = [view.augment for view in recipe.resolved_views() if view.role == "global"]
    augmenter = Augmenter(global_views[0] if global_views else recipe.augment, opened.data.image_size,
                          opened.trained.mean, opened.trained.std)
    views = augmenter(raw, torch.Generator(device=raw.device).manual_seed(0))
    augmentations = {}
    with torch.no_grad():
        for name, function in functions.items():
            if function is not None:
                reference = function(images)
                augmentations[name] = relative_error(function(views), reference, reference)
    return invariance, augmentations


def translation_rows(backbone: nn.Module, images: torch.Tensor) -> dict | None:
    """The last map's translation equivariance (measures/translation.py), or None without a spatial map."""
    from hssl_cli.evaluate.measures.translation import translation_equivariance

    try:
        return translation_equivariance(backbone, images)
    except HsslError:  # no spatial map (feature_map names why): nothing to measure
        return None


def _gated_errors(layers: list[dict], invariance: dict, translations: dict | None, scales: dict | None,
                  test_group: Group, rotations_gated: bool) -> list[float]:
    """The errors held against the tolerance: those of exact elements (rotations by multiples of 90 degrees and
    flips, if gated; shifts by whole map cells; exact scale levels)."""
    exact = {test_group.label(e) for e in range(test_group.size) if test_group.is_exact(e)}
    gated = [error for row in [*layers, {"errors": invariance["pooled features"]}]
             for label, error in row["errors"].items() if label in exact] if rotations_gated else []
    if translations is not None:
        gated += [shift["error"] for shift in translations["shifts"] if shift["exact"] and shift["error"] is not None]
    if scales is not None:
        exact_scales = {element["label"] for element in scales["elements"] if element["exact"]}
        gated += [error for row in scales["layers"] for label, error in row["errors"].items()
                  if label in exact_scales and error is not None]
    return gated


def _elements(test_group: Group, capabilities: BackboneCapabilities) -> list[dict]:
    model_group = capabilities.group
    return [{"index": e, "label": test_group.label(e), "exact": test_group.is_exact(e),
             "in_model_group": model_group is not None and model_element(test_group, e, model_group) is not None}
            for e in range(test_group.size)]
