"""Translation equivariance of a backbone's last spatial map, the identity translation H-SSL rests on:
map(T_s x)[p] = map(x)[p - s / stride]. The images are set in the middle of a blank canvas (wide enough
for the receptive field, widened no further once about 512 px), so shifted content never leaves it; positions
whose receptive field reaches the canvas border (where the map of a blank canvas differs from its centre) are
left out. Shifts by multiples of the stride move the map by whole cells and are exact; a shift by half the
stride moves it by half a cell, which only an interpolation of the map approximates: reported, never gated.

Images wider than 96 px are centre-cropped to 96 px first: the identity holds for any content, and the canvas
(a few times the content's width) would otherwise grow with the image, 1,536 px wide for 512-px images, and
take minutes on a CPU; the result says so (`reduced`).

A transformer's token grid (models/vit.py) has no border to keep away from (attention reaches every token): it is
measured under cyclic shifts of the image by whole patches, which permute the patches exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.models.capabilities import capabilities_of
from hssl_cli.models.spatial import feature_map

MAX_CANVAS = 512  # pixels: the canvas widens no further once it and two more content widths pass this
MAX_CONTENT = 96  # pixels: wider images are centre-cropped to this before they are set on the canvas
STRIDE_PROBE = 64  # pixels: the stride is read from how many cells the map grows by per this many pixels
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


def map_stride(backbone: nn.Module, images: torch.Tensor) -> int | None:
    """Pixels per cell of the last map, or None where it is not a divisor of STRIDE_PROBE, or where the backbone
    refuses inputs of other sizes (a transformer built for one size). Read from growth, not from size // map
    size: the map of a 28-px image through three stride-2 stages is 4 cells wide (28 -> 14 -> 7 -> 4), which says
    7 where the stride is 8; any stack of strided layers, padded or not, grows by one cell per stride pixels."""
    channels, size = images.shape[1], images.shape[-1]
    try:
        widths = [feature_map(backbone, images.new_zeros(1, channels, size + extra, size + extra)).shape[-1]
                  for extra in (0, STRIDE_PROBE, 2 * STRIDE_PROBE)]
    except (RuntimeError, AssertionError, ValueError):  # e.g. timm: "Input height (96) doesn't match model (224)"
        return None
    growth = widths[1] - widths[0]
    if growth <= 0 or STRIDE_PROBE % growth or widths[2] - widths[1] != growth:
        return None
    return STRIDE_PROBE // growth


def centre_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    return images[..., top:top + side, left:left + side]


@torch.no_grad()
def translation_equivariance(backbone: nn.Module, images: torch.Tensor) -> dict:
    """{stride, canvas, grid, positions (unaffected by the border), image_size, content, reduced, cyclic,
    shifts: [{label, pixels, exact, error}]}; error is ||map(T_s x) - moved map(x)|| / ||map(x)|| over the
    unaffected positions (those whose source is too). {skipped: why} where the stride cannot be read.
    A transformer's token grid is measured under cyclic shifts instead (token_grid_equivariance)."""
    image_size = images.shape[-1]
    first = feature_map(backbone, images[:1])  # at the backbone's own size: an HsslError where it has no spatial map
    if capabilities_of(backbone).spatial_map == "token_grid":
        return token_grid_equivariance(backbone, images, image_size // first.shape[-1])
    images = centre_crop(images, min(image_size, MAX_CONTENT))
    size = images.shape[-1]
    stride = map_stride(backbone, images)
    if stride is None:
        return {"skipped": f"the last map's stride could not be read (not a divisor of {STRIDE_PROBE} px, or the "
                           "backbone refuses other input sizes)"}
    canvas, mask = _canvas_out_of_reach(backbone, images, stride)
    reference = feature_map(backbone, canvas)
    rows = [_shift_row(backbone, canvas, reference, mask, stride, shift) for shift in _shifts(stride)]
    reduced = None if size == image_size else (f"on the {size}-px centre of each {image_size}-px image: whole "
                                               f"images would need a canvas {3 * image_size:,} px wide or more")
    return {"stride": stride, "canvas": canvas.shape[-1], "grid": [reference.shape[-2], reference.shape[-1]],
            "positions": int(mask.sum()), "image_size": image_size, "content": size, "reduced": reduced,
            "cyclic": False, "shifts": rows}


def token_grid_equivariance(backbone: nn.Module, images: torch.Tensor, patch: int) -> dict:
    """The token grid under cyclic shifts of the image by whole patches: a shift by s permutes the patches,
    so tokens(T_s x) = roll(tokens(x), s / P) exactly where no layer reads a token's place (no position
    embeddings); no canvas (attention reaches every token, there is no border to keep away from)."""
    reference = feature_map(backbone, images)
    rows = []
    for dy, dx in _shifts(patch)[:4]:  # whole patches only: half a patch changes what each token sees
        measured = feature_map(backbone, torch.roll(images, (dy, dx), dims=(2, 3)))
        expected = torch.roll(reference, (dy // patch, dx // patch), dims=(2, 3))
        rows.append({"label": f"cyclic shift ({dy}, {dx}) px", "pixels": [dy, dx], "exact": True,
                     "error": float((measured - expected).norm() / expected.norm().clamp_min(1e-12))})
    grid = [reference.shape[-2], reference.shape[-1]]
    return {"stride": patch, "canvas": None, "grid": grid, "positions": grid[0] * grid[1],
            "image_size": images.shape[-1], "content": images.shape[-1], "reduced": None, "cyclic": True,
            "shifts": rows}


def _canvas_out_of_reach(backbone: nn.Module, images: torch.Tensor, stride: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A canvas widened until the content's cells (and two strides around them) lie out of the border's
    reach, or until it passes MAX_CANVAS, and its mask of unaffected positions."""
    size = images.shape[-1]
    needed = (size // stride + 4) ** 2
    for band in (max(size, 4 * stride), 2 * size, 4 * size, 8 * size):
        canvas = _canvas(images, band)
        mask = _unaffected(backbone, canvas)
        if mask.sum() >= needed or canvas.shape[-1] + 2 * size > MAX_CANVAS:
            break
    return canvas, mask


def _shifts(stride: int) -> list[tuple[int, int]]:
    shifts = [(stride, 0), (0, stride), (stride, stride), (2 * stride, -stride)]
    return shifts + ([(stride // 2, 0), (stride // 2, stride // 2)] if stride > 1 else [])


def _shift_row(backbone: nn.Module, canvas: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor,
               stride: int, shift: tuple[int, int]) -> dict:
    dy, dx = shift
    cells = (dy / stride, dx / stride)
    row = {"label": f"shift ({dy}, {dx}) px", "pixels": [dy, dx], "exact": dy % stride == 0 and dx % stride == 0,
           "error": None}
    keep = mask & (_moved(mask[None, None].float(), cells)[0, 0] > 1 - 1e-6)
    if keep.any():
        measured = feature_map(backbone, torch.roll(canvas, (dy, dx), dims=(2, 3)))
        expected = _moved(reference, cells)
        row["error"] = float((measured - expected)[..., keep].norm() / expected[..., keep].norm().clamp_min(1e-12))
    return row
