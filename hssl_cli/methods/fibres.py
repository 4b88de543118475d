"""H-SSL's fibres and p(G): where the lifted dimension of a backbone's representation comes from and how a
pair of its elements is drawn. Fibres z(x): (B, F, C), F group elements (rotations/flips of an e2_*
backbone, fibre of g = its channels of g), F map positions of a CNN (translations: z_p(T_s x) = z_{p-s}(x)),
both (roto-translations: F = |G| h w), or F scale levels of a multi-scale lifting (z_k(S^j x) = z_{k+j}(x)).
The structure-removed ablations live here too: PositionMixer (a soft crop, `structure: mixed`) and
EntryShuffle (`structure: removed`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hssl_cli.data.groups import Group
from hssl_cli.methods.base import random_integers
from hssl_cli.models.capabilities import capabilities_of
from hssl_cli.models.spatial import feature_map
from hssl_cli.recipe import HSSLPairsConfig


def draw_pairs(group: Group | None, pairs: HSSLPairsConfig, batch: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair g1 != g2 ~ p(G) per image, from the step's generator (`group` unused for a subset)."""
    if pairs.distribution == "subset":
        subset = torch.tensor(sorted(set(pairs.elements)), device=device)
        first = random_integers(0, len(subset), batch, generator, device)
        second = (first + random_integers(1, len(subset), batch, generator, device)) % len(subset)  # any other
        return subset[first], subset[second]
    g1 = random_integers(0, group.size, batch, generator, device)
    if pairs.distribution == "uniform":
        relative = random_integers(1, group.size, batch, generator, device)  # any h != e, so g2 = g1 h != g1
    else:  # neighbourhood: h a rotation by 1..max_steps steps, either way
        sign = 2 * random_integers(0, 2, batch, generator, device) - 1
        relative = (random_integers(1, pairs.max_steps + 1, batch, generator, device) * sign) % group.order
    return g1, group.cayley.to(device)[g1, relative]


def grid_neighbours(height: int, width: int, max_steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position p of an h x w grid (row-major), the positions q != p with Chebyshev distance
    max(|dy|, |dx|) <= max_steps (every other position when max_steps is None): a (P, K) table padded with
    -1 and the count per row."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, columns = rows.flatten(), columns.flatten()
    distance = torch.maximum((rows[:, None] - rows[None]).abs(), (columns[:, None] - columns[None]).abs())
    allowed = distance > 0
    if max_steps is not None:
        allowed &= distance <= max_steps
    counts = allowed.sum(dim=1)
    order = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)  # allowed positions first, in order
    table = torch.where(torch.arange(len(rows))[None] < counts[:, None], order, -1)
    return table[:, :int(counts.max())], counts


def draw_position_pairs(table: torch.Tensor, counts: torch.Tensor, period: int, batch: int,
                        generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """p1 uniform over the grid, p2 uniform over p1's allowed partners (grid_neighbours): an integer uniform
    below `period`, a common multiple of the counts (count_period), modulo p1's count is exactly uniform."""
    p1 = random_integers(0, len(counts), batch, generator, device)
    column = random_integers(0, period, batch, generator, device) % counts.to(device)[p1]
    return p1, table.to(device)[p1, column]


def level_neighbours(levels: int, max_steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale levels k != k' with |k - k'| <= max_steps (any other level when None): a 1 x K grid's table."""
    return grid_neighbours(1, levels, max_steps)


def count_period(counts: torch.Tensor) -> int:
    """The least common multiple of the partner counts (a few hundred at most for a CNN map's grid)."""
    return math.lcm(*counts.tolist())


def group_fibres(backbone: nn.Module, images: torch.Tensor, group: Group) -> torch.Tensor:
    """(B, |G|, C), pooled over space. Equivariant backbones (and their plain twins) say which channels form
    fibre g; any other backbone's features are cut into |G| consecutive pseudo-fibres."""
    if capabilities_of(backbone).group is not None:
        return backbone.lifted(images)
    features = backbone(images)
    return features.view(len(features), group.size, -1)


def position_fibres(backbone: nn.Module, images: torch.Tensor, layer: str, group: Group | None) -> torch.Tensor:
    """(B, h w, C) from the map's positions; with `group` (an e2_* backbone) (B, |G| h w, C), element-major:
    fibre g h w + p is field g at position p."""
    maps = feature_map(backbone, images, layer)
    batch, channels = maps.shape[:2]
    lifted_group = capabilities_of(backbone).group
    if lifted_group is not None:  # equivariant: C fields of |G| channels each, field-major
        size = lifted_group.size
        maps = maps.view(batch, channels // size, size, -1)  # (B, C, |G|, h w)
        if group is None:
            return maps.amax(dim=2).transpose(1, 2)  # positions only: invariant to the group (max over it)
        return maps.permute(0, 2, 3, 1).reshape(batch, -1, channels // size)
    return maps.flatten(2).transpose(1, 2)


class PositionMixer(nn.Module):
    """The structure-removed ablation of position fibres: each pseudo-position is a learned linear mix of
    every position (token mixing, as in MLP-Mixer), so no pseudo-position is a translation of another."""

    def __init__(self, positions: int):
        super().__init__()
        self.mix = nn.Linear(positions, positions, bias=False)

    def forward(self, fibres: torch.Tensor) -> torch.Tensor:
        return self.mix(fibres.transpose(1, 2)).transpose(1, 2)  # (B, P, C): z'_q = sum_p M_qp z_p


class EntryShuffle(nn.Module):
    """The ablation that changes only the fibres' structure (`structure: shuffled`, every fibre kind; for
    position fibres `removed` too, on the plain twin of an e2_* backbone): the F x C entries (fibre, channel)
    are permuted by a fixed random permutation drawn at construction (from the global generator that seeds the
    initial weights, after the heads; kept in the checkpoint), and cut back into F pseudo-fibres of C entries:
    channel c of pseudo-fibre q is some channel of some fibre, so no pseudo-fibre is the feature of a
    transformed image. The backbone, the fibre size and the pooled features a probe reads are those of `kept`."""

    def __init__(self, positions: int, channels: int):
        super().__init__()
        self.register_buffer("permutation", torch.randperm(positions * channels))

    def forward(self, fibres: torch.Tensor) -> torch.Tensor:
        batch, positions, channels = fibres.shape
        return fibres.reshape(batch, -1)[:, self.permutation].view(batch, positions, channels)
