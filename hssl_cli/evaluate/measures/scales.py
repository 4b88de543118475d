"""Scale equivariance of a multi-scale lifting (models/scale_lifted.py), the identity scale H-SSL rests on:
level k of S^j x is level k + j of x, z_k(S^j x) = z_(k+j)(x), at every stage of the network and for the
pooled fibres. S^j by average pooling (data/scales.py) composes exactly: those rows are gated. The same
size reached by antialiased bilinear resizing is another filter, not S^j: reported, never gated."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.scales import FACTOR, downscale, downscale_bilinear, shift_levels
from hssl_cli.models.capabilities import capabilities_of


def _error(measured: torch.Tensor, expected: torch.Tensor) -> float | None:
    """None where the maps differ in size (the structure-removed twin runs every level at full size)."""
    if measured.shape != expected.shape:
        return None
    return float((measured - expected).norm() / expected.norm().clamp_min(1e-12))


@torch.no_grad()
def scale_equivariance(backbone: nn.Module, images: torch.Tensor) -> dict:
    """{levels, factor, elements: [{label, steps, exact}], layers: [{name, errors: {label: error}}]}: per stage,
    ||stage_k(S^j x) - stage_(k+j)(x)|| / ||stage_(k+j)(x)|| over the levels k < K - j, then the pooled fibres."""
    levels = capabilities_of(backbone).needs_scale_levels("the scale equivariance check")
    elements = []
    for steps in range(1, levels):
        elements.append({"label": f"x1/{FACTOR ** steps} (average pooling)", "steps": steps, "exact": True,
                         "act": downscale})
    elements.append({"label": f"x1/{FACTOR} (bilinear)", "steps": 1, "exact": False, "act": downscale_bilinear})
    reference = {k: backbone.stage_outputs(images, k) for k in range(levels)}
    reference_lifted = backbone.lifted(images)
    names = [name for name, _ in reference[0]]
    rows = [{"name": name, "errors": {}} for name in names] + [{"name": "lifted (pooled)", "errors": {}}]
    for element in elements:
        steps, label = element["steps"], element["label"]
        transformed = element["act"](images, steps)
        for index in range(len(names)):
            measured = [backbone.stage_outputs(transformed, k)[index][1] for k in range(levels - steps)]
            expected = [reference[k + steps][index][1] for k in range(levels - steps)]
            same = all(m.shape == e.shape for m, e in zip(measured, expected, strict=True))
            rows[index]["errors"][label] = _error(torch.cat([m.flatten(1) for m in measured], dim=1),
                                                  torch.cat([e.flatten(1) for e in expected], dim=1)) if same else None
        expected_lifted, filled = shift_levels(reference_lifted, steps)
        rows[-1]["errors"][label] = _error(backbone.lifted(transformed)[:, filled], expected_lifted)
    return {"levels": levels, "factor": FACTOR,
            "elements": [{k: v for k, v in element.items() if k != "act"} for element in elements],
            "layers": rows}
