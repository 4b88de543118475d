"""`hssl equivariance-check`: does a model have the symmetries its backbone promises, layer by layer?

Three kinds of transformation T of a batch x of test images, each error relative, in Frobenius norms over
the whole batch:
- rotations and flips, a test group C_N or D_N acting on images (data/groups.py): every layer of an equivariant
  (e2_*) backbone and its pooled lifted fibres, ||f(T_g x) - L_g f(x)|| / ||f(x)|| (measures/equivariance.py),
  and for any backbone the invariance of the pooled features and of the embedding, ||f(T_g x) - f(x)|| / ||f(x)||,
  and the same under one draw of the recipe's augmentations;
- translations of the last spatial map of any convolutional backbone, and cyclic shifts by whole patches of a
  vit's token grid (measures/translation.py);
- the scale levels of a multi-scale lifting (model.scales, measures/scales.py), stage by stage.

Gated (a row that can fail the check) is only what the backbone promises, at elements that act exactly on the
pixel grid: an equivariant backbone's own group at multiples of 90 degrees and flips (its layers and its
pooled features), shifts by whole cells of a convolutional map, and a lifting's average-pooled scale levels.
`expect_invariant` (--expect-invariant) asserts the pooled features' invariance under every exact element
of the test group for a backbone that promises less. Every other row is a measurement: reported, never failing.
Each row says which of its elements are gated (gated_elements) and why."""

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
                       data_root: str | None = None, verify: bool = True, expect_invariant: bool = False) -> dict:
    """Measure everything in the module docstring on a checkpoint or on a recipe's freshly initialised model;
    `passed` is False when a gated error exceeds `tolerance` or is NaN."""
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
    count, reduced = _samples_in_budget(opened, tuple(split.images.shape[1:]), samples)
    raw = split.images[fixed_sample(len(split.labels), count)].to(opened.trained.mean.device)
    images = normalize(raw, opened.trained.mean, opened.trained.std)

    equivariant_group = model_group is not None and capabilities.equivariant
    layers = layer_equivariance(backbone, images, test_group) if equivariant_group else []
    invariance = _invariances(opened, raw, images, test_group)
    translations = translation_rows(backbone, images[:TRANSLATION_SAMPLES])
    scales = scale_equivariance(backbone, images) if capabilities.scale_levels is not None else None
    _gate_rotations(layers, invariance, test_group, capabilities, _subject(opened, capabilities), expect_invariant)
    _gate_translations(translations, capabilities)
    _gate_scales(scales, capabilities)
    gated = _gated_errors(layers, invariance, translations, scales)
    # a NaN error is the worst of all (max() would drop it unless it came first)
    worst = float("nan") if any(error != error for error in gated) else max(gated, default=None)
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
        "samples_reduced": reduced,
        "image_size": opened.data.image_size,
        "dataset": opened.data.dataset,
        "expect_invariant": expect_invariant,
        "layers": layers,
        "invariance": invariance,
        "translations": translations,
        "scales": scales,
        "tolerance": tolerance,
        "gated_errors": len(gated),
        "worst_gated_error": worst,
        "passed": worst is None or worst <= tolerance,  # False for NaN
        "seconds": round(time.perf_counter() - started, 2),
    }


def _invariances(opened: EvaluationInputs, raw: torch.Tensor, images: torch.Tensor, test_group: Group
                 ) -> list[dict]:
    """Rows {name, errors, augmentation}: the pooled features' (and the embedding's) invariance under each element
    of `test_group`, and under one draw of the first global view's training augmentation (views: may override
    augment:)."""
    from hssl_cli.data.augment import Augmenter

    method, recipe = opened.method, opened.recipe
    functions = {"pooled features": method.backbone, "embedding": method.embedding if method.has_embedding else None}
    global_views = [view.augment for view in recipe.resolved_views() if view.role == "global"]
    augmenter = Augmenter(global_views[0] if global_views else recipe.augment, opened.data.image_size,
                          opened.trained.mean, opened.trained.std)
    views = augmenter(raw, torch.Generator(device=raw.device).manual_seed(0))
    rows = []
    for name, function in functions.items():
        if function is None:
            continue
        with torch.no_grad():
            reference = function(images)
            augmentation = relative_error(function(views), reference, reference)
        rows.append({"name": name, "errors": group_invariance(function, images, test_group),
                     "augmentation": augmentation})
    return rows


def _samples_in_budget(opened: EvaluationInputs, image_shape: tuple[int, ...], samples: int) -> tuple[int, str | None]:
    """The images the check passes through the backbone at once (every group element, every scale level): at
    most what the memory budget allows (forward_memory.images_per_pass), at least 2; and why, when fewer."""
    from hssl_cli.data.augment import normalize
    from hssl_cli.evaluate.forward_memory import images_per_pass

    trained = opened.trained
    fits = images_per_pass(lambda batch: trained.method.backbone(normalize(batch, trained.mean, trained.std)),
                           image_shape, trained.mean.device, samples)
    if fits >= samples:
        return samples, None
    return max(fits, 2), f"--samples {samples} reduced to {max(fits, 2)} by the memory budget"


def translation_rows(backbone: nn.Module, images: torch.Tensor) -> dict | None:
    """The last map's translation equivariance (measures/translation.py), or None without a spatial map."""
    from hssl_cli.evaluate.measures.translation import translation_equivariance

    try:
        return translation_equivariance(backbone, images)
    except HsslError:  # no spatial map (feature_map names why): nothing to measure
        return None


def _subject(opened: EvaluationInputs, capabilities: BackboneCapabilities) -> str:
    """The backbone as the gates' reasons name it: 'small_convnet', 'the C8 e2_convnet', 'the 3-level scale
    lifting of small_convnet', with 'the structure-removed twin of' where it is one."""
    name = opened.recipe.model.backbone
    if capabilities.scale_levels is not None:
        subject = f"the {capabilities.scale_levels}-level scale lifting of {name}"
    elif capabilities.group is not None:
        subject = f"the {capabilities.group.name} {name}"
    else:
        return name
    return subject if capabilities.equivariant else f"the structure-removed twin of {subject}"


def _gate(row: dict, elements: list[str], why: str) -> None:
    row |= {"gated": bool(elements), "gated_elements": elements, "why": why}


def _gate_rotations(layers: list[dict], invariance: list[dict], test_group: Group,
                    capabilities: BackboneCapabilities, subject: str, expect_invariant: bool) -> None:
    """Which rotation/flip errors are gated: the exact elements of an equivariant backbone's own group (its
    layers and pooled features), or with `expect_invariant` every exact element for the pooled features."""
    exact = [test_group.label(e) for e in range(test_group.size) if test_group.is_exact(e)]
    group = capabilities.group if capabilities.equivariant else None
    promised = [test_group.label(e) for e in range(test_group.size) if test_group.is_exact(e)
                and group is not None and model_element(test_group, e, group) is not None]
    for row in layers:
        _gate(row, [label for label in promised if label in row["errors"]],
              f"gated at exact elements: {subject} promises {group.name} equivariance")
    for row in invariance:
        if row["name"] != "pooled features":
            _gate(row, [], "measured: the method's head (only pooled features are gated)")
        elif expect_invariant:
            _gate(row, exact, "gated at exact elements: --expect-invariant"
                  + ("" if promised else f" ({subject} promises no rotation invariance)"))
        elif promised:
            outside = len(exact) - len(promised)
            _gate(row, promised, f"gated at exact elements: {subject} promises invariance to {group.name}"
                  + (f"; {outside} exact elements outside {group.name} measured" if outside else ""))
        else:
            _gate(row, [], f"measured: {subject} promises no rotation invariance (--expect-invariant gates it)")


def _gate_translations(translations: dict | None, capabilities: BackboneCapabilities) -> None:
    """Shifts by whole cells are gated for every convolutional map; half a cell is interpolated. A token grid's
    cyclic shifts are gated without position embeddings, measured with them."""
    for row in (translations or {}).get("shifts", []):
        if translations["cyclic"]:
            row |= ({"gated": False, "why": "measured: absolute position embeddings promise no translation"}
                    if capabilities.position_embedding else
                    {"gated": True, "why": "gated: without position embeddings the blocks permute with the patches"})
        elif not row["exact"]:
            row |= {"gated": False, "why": "measured: half a cell, interpolated"}
        elif row["error"] is None:
            row |= {"gated": False, "why": "not measured: no position far enough from the canvas border"}
        else:
            row |= {"gated": True, "why": "gated: convolutions commute with whole-cell shifts"}


def _gate_scales(scales: dict | None, capabilities: BackboneCapabilities) -> None:
    """A lifting's average-pooled levels are gated; bilinear resizing, and every level of the twin, measured."""
    if scales is None:
        return
    exact = [element["label"] for element in scales["elements"] if element["exact"]]
    for row in scales["layers"]:
        if capabilities.equivariant:
            _gate(row, [label for label in exact if row["errors"][label] is not None],
                  "gated at average pooling: the lifting's levels are exact down-scalings")
        else:
            _gate(row, [], "measured: the structure-removed twin promises no scale equivariance")


def _gated_errors(layers: list[dict], invariance: list[dict], translations: dict | None,
                  scales: dict | None) -> list[float]:
    """The errors held against the tolerance: those the gates above chose."""
    rows = [*layers, *invariance, *((scales or {}).get("layers", []))]
    gated = [row["errors"][label] for row in rows for label in row["gated_elements"]]
    gated += [row["error"] for row in (translations or {}).get("shifts", []) if row["gated"]]
    return [error for error in gated if error is not None]


def _elements(test_group: Group, capabilities: BackboneCapabilities) -> list[dict]:
    model_group = capabilities.group
    return [{"index": e, "label": test_group.label(e), "exact": test_group.is_exact(e),
             "in_model_group": model_group is not None and model_element(test_group, e, model_group) is not None}
            for e in range(test_group.size)]
