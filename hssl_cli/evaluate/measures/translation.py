"""Translation equivariance of a backbone's last spatial map, the identity translation H-SSL rests on:
map(T_s x)[p] = map(x)[p - s / stride]. The images are set in the middle of a blank canvas (wide enough
for the receptive field, up to 512 px), so shifted content never leaves it; positions whose receptive
field reaches the canvas border (where the map of a blank canvas differs from its centre) are left out.
Shifts by multiples of the stride move the map by whole cells and are exact; a shift by half the stride
moves it by half a cell, which only an interpolation of the map approximates: reported, never gated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.models.spatial import feature_map

MAX_CANVAS = 512  # pixels: the widest canvas tried for a backbone with a large receptive field
BORDER_TOLERANCE = 1e-6  # relative change of a blank canvas's map that marks a position as border-affected


def _canvas(images: torch.Tensor, band: int) -> torch.Tensor:
    return F.pad(images, (band, band, band, band))  # normalised images: 0 is the mean pixel


def _unaffected(backbone: nn.Module, canvas: torch.Tensor) -> torch.Tensor:
    """(h, w) mask of the positions the canvas border does not reach."""
    blank = feature_map(backbone, torch.zeros_like(canvas[:1]))[0]  # (C, h, w)
    centre = blank[:, blank.shape[1] // 2, blank.shape[2] // 2]
    change = (blank - centre[:, None, None]).abs().amax(dim=0) / centre.abs().max().clamp_min(1e-12)
    return change <= BORDER_TOLERANCE


def _moved(maps: torch.Tensor, cells: tuple[float, float]) -> torch.Tensor:
    """The map moved by (dy, dx) cells, zero where the source lies outside the grid: exact for whole cells
    (every sample falls on a cell centre), bilinear interpolation otherwise."""
    dy, dx = cells
    height, width = maps.shape[-2:]
    theta = torch.tensor([[1.0, 0.0, -2 * dx / width], [0.0, 1.0, -2 * dy / height]], dtype=maps.dtype,
                         device=maps.device).expand(len(maps), 2, 3)
    grid = F.affine_grid(theta, list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def translation_equivariance(backbone: nn.Module, images: torch.Tensor) -> dict:
    """{stride, grid, positions (unaffected by the border), shifts: [{label, pixels, exact, error}]}; error is
    ||map(T_s x) - moved map(x)|| / ||map(x)|| over the unaffected positions (those whose source is too)."""
    probe = feature_map(backbone, images[:1])
    stride = images.shape[-1] // probe.shape[-1]
    size = images.shape[-1]
    # a wider canvas until the content's cells (and two strides around them) lie out of the border's reach
    needed = (size // stride + 4) ** 2
    for band in (max(size, 4 * stride), 2 * size, 4 * size, 8 * size):
        canvas = _canvas(images, band)
        mask = _unaffected(backbone, canvas)
        if mask.sum() >= needed or canvas.shape[-1] + 2 * size > MAX_CANVAS:
            break
    reference = feature_map(backbone, canvas)
    height = reference.shape[-1]
    shifts = [(stride, 0), (0, stride), (stride, stride), (2 * stride, -stride)]
    if stride > 1:
        shifts += [(stride // 2, 0), (stride // 2, stride // 2)]
    rows = []
    for dy, dx in shifts:
        cells = (dy / stride, dx / stride)
        exact = dy % stride == 0 and dx % stride == 0
        measured = feature_map(backbone, torch.roll(canvas, (dy, dx), dims=(2, 3)))
        expected = _moved(reference, cells)
        source_ok = _moved(mask[None, None].float(), cells)[0, 0] > 1 - 1e-6
        keep = mask & source_ok
        label = f"shift ({dy}, {dx}) px"
        if not keep.any():
            rows.append({"label": label, "pixels": [dy, dx], "exact": exact, "error": None})
            continue
        error = (measured - expected)[..., keep].norm() / expected[..., keep].norm().clamp_min(1e-12)
        rows.append({"label": label, "pixels": [dy, dx], "exact": exact, "error": float(error)})
    return {"stride": stride, "canvas": canvas.shape[-1], "grid": [height, reference.shape[-2]],
            "positions": int(mask.sum()), "shifts": rows}
