"""Does a representation keep the augmentation it was trained to ignore? A linear probe of the augmentation
parameters: for held-out images x and one draw t ~ the recipe's first global view, regress the parameter
vector a_t (EquiMod's, data/augment.PARAM_NAMES) on [f(x), f(t(x))] and report R² per parameter on other
images than the regression was fitted on. An invariant f (f(t(x)) = f(x)) gives R² ~ 0 for every parameter;
EquiMod's claim (Devillers & Lefort 2023) is that its f keeps this information where its base does not.

Ridge regression on standardised features, the ridge chosen by efficient leave-one-out on the fitting
half (scikit-learn's RidgeCV); parameters that do not vary under the recipe's augmentation are left out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hssl_cli.errors import HsslError

if TYPE_CHECKING:
    import torch

    from hssl_cli.evaluate.opening import TrainedMethod
    from hssl_cli.recipe import ResolvedView

CHUNK = 256  # images per forward pass, at most (fewer where the memory budget asks: forward_memory)
RIDGES = tuple(10.0 ** exponent for exponent in range(-2, 6))
# parameters reported together (the mean R² of the group's varying parameters)
PARAMETER_GROUPS = {
    "crop": ("crop_i", "crop_j", "crop_h", "crop_w"),
    "flip": ("flip",),
    "colour": ("jitter_applied", "brightness", "contrast", "saturation", "hue", "grayscale"),
    "jitter_order": ("jitter_order_0", "jitter_order_1", "jitter_order_2", "jitter_order_3"),
    "blur": ("blur_applied", "blur_sigma"),
    "solarize": ("solarize",),
}


def r2_scores(predicted, target) -> list[float]:
    """Per column: 1 - sum (y - y_hat)^2 / sum (y - mean y)^2 (numpy arrays (N, P))."""
    residual = ((target - predicted) ** 2).sum(axis=0)
    total = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    return [float(1 - r / t) for r, t in zip(residual, total, strict=True)]


def check_options(samples: int, refused_options: Sequence[str]) -> None:
    """`hssl probe --augmentation` regresses the recipe's own augmentation parameters on its train split: of
    the probe's options it takes only --train-samples (`samples`); `refused_options` names the others given."""
    if refused_options:
        raise HsslError(f"--augmentation regresses the recipe's own augmentation parameters on its train split "
                        f"and takes only --train-samples; drop {', '.join(refused_options)}")
    if samples < 20:
        raise HsslError(f"{samples} images (--train-samples, or augmentation_probe.samples in a suite): too few to "
                        "fit and score a regression; use at least 20")


def augmentation_probe(path: Path, samples: int = 4096, device_name: str = "auto", seed: int = 0,
                       verify: bool = True, refused_options: Sequence[str] = ()) -> dict:
    """R² of a linear regression from [f(x), f(t(x))] to a_t on `samples` train images (a fixed subset), fitted
    on the first half and scored on the second. `refused_options`: options of `hssl probe` given with
    --augmentation, which it does not take (an error)."""
    import numpy as np

    from hssl_cli.engine.device import resolve_device
    from hssl_cli.evaluate.opening import open_for_evaluation
    from hssl_cli.evaluate.subsets import fixed_sample

    check_options(samples, refused_options)
    started = time.perf_counter()
    opened = open_for_evaluation(path, resolve_device(device_name), verify=verify)
    recipe = opened.recipe
    view = next((view for view in recipe.resolved_views() if view.role == "global"), None)
    if view is None:
        raise HsslError(f"{path}: method {recipe.method.name} draws no augmented views; nothing to predict")
    images = opened.read_split(opened.data.train_split).images
    x, y = _paired_features(opened.trained, view, images, fixed_sample(len(images), samples), seed)
    half = len(x) // 2
    scores, ridge = _r2_by_parameter(x[:half], y[:half], x[half:], y[half:])
    if not scores:
        raise HsslError(f"{path}: no augmentation parameter varies under the recipe's augment:; nothing to predict")
    groups = {}
    for group, names in PARAMETER_GROUPS.items():
        present = [scores[name] for name in names if name in scores]
        if present:
            groups[group] = float(np.mean(present))
    return {
        "checkpoint": opened.source,
        "method": recipe.method.name,
        "features": "backbone: [f(x), f(t(x))]",
        "view": f"first global view, {view.size} px",
        "fit_images": half,
        "scored_images": len(x) - half,
        "ridge": ridge,
        "r2": float(np.mean(list(scores.values()))),
        "r2_by_group": groups,
        "r2_by_parameter": scores,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _paired_features(trained: TrainedMethod, view: ResolvedView, images: torch.Tensor, chosen: torch.Tensor,
                     seed: int):
    """(x, y) as float64 numpy arrays: x = [f(x), f(t(x))] per chosen image, y = the parameter vector a_t of its
    draw t (a generator seeded with `seed`, one draw per CHUNK images), CHUNK images per forward pass at most."""
    import torch

    from hssl_cli.data.augment import Augmenter, ViewParams, normalize
    from hssl_cli.evaluate.forward_memory import images_per_pass

    device = trained.mean.device
    augmenter = Augmenter(view.augment, view.size, trained.mean, trained.std)
    input_size = tuple(images.shape[-2:])

    def paired(batch: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """[f(x), f(t(x))] of uint8 images x and their draws t."""
        batch = batch.to(device)
        original = (normalize(batch, trained.mean, trained.std) if view.size == batch.shape[-1]
                    else augmenter.apply(batch, ViewParams.identity(len(batch), device)))
        pair = trained.method.backbone(torch.cat([original, augmenter.apply(batch, params)])).float().chunk(2)
        return torch.cat(pair, dim=1)

    def measured(batch: torch.Tensor) -> torch.Tensor:  # a generator of its own: the probe's draws stay its own
        return paired(batch, augmenter.sample(len(batch), torch.Generator(device).manual_seed(seed), device,
                                              input_size))

    features, parameters = [], []
    with torch.no_grad():
        per_pass = images_per_pass(measured, tuple(images.shape[1:]), device, CHUNK)
        generator = torch.Generator(device).manual_seed(seed)
        for start in range(0, len(chosen), CHUNK):
            group = chosen[start:start + CHUNK]
            drawn = augmenter.sample(len(group), generator, device, input_size).as_vector()
            for part in range(0, len(group), per_pass):
                params = ViewParams.from_vector(drawn[part:part + per_pass])
                features.append(paired(images[group[part:part + per_pass]], params).cpu())
            parameters.append(drawn.cpu())
    return torch.cat(features).double().numpy(), torch.cat(parameters).double().numpy()


def _r2_by_parameter(x_fit, y_fit, x_scored, y_scored) -> tuple[dict[str, float], float]:
    """({parameter: R² on the scored rows}, the ridge RidgeCV chose) of a ridge regression fitted on the fit rows,
    for the parameters that vary in both halves; features and targets standardised with the fit rows' statistics."""
    from sklearn.linear_model import RidgeCV

    from hssl_cli.data.augment import PARAM_NAMES

    varying = [index for index in range(y_fit.shape[1]) if y_fit[:, index].std() > 0 and y_scored[:, index].std() > 0]
    if not varying:
        return {}, float("nan")
    x_mean, x_std = x_fit.mean(axis=0), x_fit.std(axis=0) + 1e-8
    y_mean, y_std = y_fit[:, varying].mean(axis=0), y_fit[:, varying].std(axis=0)
    regression = RidgeCV(alphas=RIDGES).fit((x_fit - x_mean) / x_std, (y_fit[:, varying] - y_mean) / y_std)
    predicted = regression.predict((x_scored - x_mean) / x_std)
    r2 = r2_scores(predicted, (y_scored[:, varying] - y_mean) / y_std)
    return dict(zip([PARAM_NAMES[i] for i in varying], r2, strict=True)), float(regression.alpha_)
