"""Homomorphic SSL (Keller, Suau & Zappella 2023): self-supervision from the structure of an equivariant
backbone instead of from input augmentations.

f(T_g x) = L_g f(x) with (L_g z)_h = z_{g^-1 h}, so a head reading the identity fibre sees
h(z_e(T_g x)) = h(z_{g^-1}(x)): the augmented pair (T_g1 x, T_g2 x) is two fibres of ONE forward pass.
Positives (h(z_g1(x)), h(z_g2(x))), g1 != g2 ~ p(G); negatives the other images' fibres; the pairwise
loss is NT-Xent, VICReg or BYOL's. `pairing: inputs` is the augmentation-SSL twin (identity fibres of
T_g1 x and T_g2 x, two passes); `structure: removed` the ablation on a non-equivariant backbone,
`structure: shuffled` the ablation on the SAME backbone: the fibres' entries permuted by a fixed permutation.

Translations (`fibres: positions`): any CNN is equivariant to shifts by its stride, so the positions of a
feature map are the fibres, and a pair of positions of one pass stands for a pair of crops of the image;
`fibres: group_and_positions` pairs roto-translations on an e2_* backbone; `fibres: scales` pairs the levels
of a multi-scale lifting (models/scale_lifted.py), a pair of down-scaled views (methods/fibres.py).
"""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.groups import Group, act_on_images
from hssl_cli.data.scales import coarsen
from hssl_cli.data.views import Views
from hssl_cli.errors import HsslError
from hssl_cli.losses import byol_cosine, info_nce, vicreg
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.byol import make_target, target_momentum, update_target
from hssl_cli.methods.fibres import (
    EntryShuffle,
    PositionMixer,
    count_period,
    draw_pairs,
    draw_position_pairs,
    grid_neighbours,
    group_fibres,
    level_neighbours,
    position_fibres,
)
from hssl_cli.models.capabilities import capabilities_of
from hssl_cli.models.heads import mlp
from hssl_cli.models.spatial import layers_after_map, map_size
from hssl_cli.recipe import ModelConfig, Recipe

IDENTITY = 0  # index of the identity element in every group of data/groups.py


class HSSL(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe, in_channels: int):
        super().__init__(backbone)
        model, config = recipe.model, recipe.method
        self.fibres_kind, self.layer = config.fibres, config.fibres_from
        with_group = config.fibres in ("group", "group_and_positions")
        self.group = Group(model.group.name, model.group.order) if with_group else None
        self.pairing, self.loss_name, self.pairs = config.pairing, config.loss, config.pairs
        self.mixer = None
        capabilities = capabilities_of(backbone)
        if config.fibres == "group":
            fibre_dim = self._fibre_dim(backbone, model)
        elif config.fibres == "scales":
            capabilities.needs_scale_levels("method.fibres: scales")
            fibre_dim = backbone.feature_dim
            steps = config.pairs.max_steps if config.pairs.distribution == "neighbourhood" else None
            self._pair_table(*level_neighbours(model.scales.levels, steps))
        else:
            channels, height, width = map_size(backbone, in_channels, recipe.data.image_size, self.layer)
            fibre_dim = channels // capabilities.group.size if capabilities.group is not None else channels
            steps = config.pairs.max_steps if config.pairs.distribution == "neighbourhood" else None
            self._pair_table(*grid_neighbours(height, width, steps))
            fibres = height * width * (self.group.size if self.group is not None else 1)
            for layer in layers_after_map(backbone, self.layer):  # no gradient reaches them: say so (DDP waits
                layer.requires_grad_(False)  # for every parameter that requires one)
            if config.structure == "mixed":
                self.mixer = PositionMixer(fibres)
        self.projector = mlp(fibre_dim, model.projector)  # the shared head h
        self.temperature = config.temperature
        self.vicreg_weights = {"invariance_weight": config.invariance_weight,
                               "variance_weight": config.variance_weight,
                               "covariance_weight": config.covariance_weight}
        if config.loss == "byol":
            self.predictor = mlp(model.projector[-1], config.predictor)
            self.target = make_target(backbone, self.projector)
            self.ema_start = config.ema_start
        # drawn after the heads, so that a seed initialises backbone and heads as in the kept arm
        if config.structure == "shuffled" and config.fibres in ("group", "scales"):
            count = self.group.size if config.fibres == "group" else model.scales.levels
            self.mixer = EntryShuffle(count, fibre_dim)
        elif config.structure in ("removed", "shuffled") and config.fibres in ("positions", "group_and_positions"):
            self.mixer = EntryShuffle(fibres, fibre_dim)  # removed: the same shuffle, on the plain twin (e2_*)

    def _pair_table(self, table: torch.Tensor, counts: torch.Tensor) -> None:
        self.register_buffer("neighbour_table", table, persistent=False)  # follows the architecture
        self.register_buffer("neighbour_counts", counts, persistent=False)
        self.neighbour_period = count_period(counts)

    def _fibre_dim(self, backbone: nn.Module, model: ModelConfig) -> int:
        if capabilities_of(backbone).group is not None:
            return backbone.feature_dim
        if backbone.feature_dim % self.group.size:
            raise HsslError(f"model.backbone '{model.backbone}' gives {backbone.feature_dim} features, which do not "
                            f"split into |G| = {self.group.size} pseudo-fibres; pick a group whose size divides it")
        return backbone.feature_dim // self.group.size

    @classmethod
    def from_recipe(cls, recipe: Recipe, in_channels: int) -> HSSL:
        from hssl_cli.models.backbones import build_backbone

        # structure removed: the ablation's backbone, the layout without equivariance
        backbone = build_backbone(recipe.model, in_channels, plain=recipe.method.structure == "removed",
                                  image_size=recipe.data.image_size)
        return cls(backbone, recipe, in_channels)

    def fibres(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """z(x): (B, F, C), the fibres this method pairs (mixed or shuffled, in the ablations)."""
        if self.fibres_kind == "group":
            lifted = group_fibres(backbone, images, self.group)
        elif self.fibres_kind == "scales":
            lifted = backbone.lifted(images)
        else:
            lifted = position_fibres(backbone, images, self.layer, self.group)
        return lifted if self.mixer is None else self.mixer(lifted)

    def draw(self, batch: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Fibre indices (i1, i2), i1 != i2 ~ p(G), one pair per image, from the step's generator."""
        if self.fibres_kind == "group":
            return draw_pairs(self.group, self.pairs, batch, generator, device)
        if self.fibres_kind == "scales" and self.pairs.distribution == "subset":
            return draw_pairs(None, self.pairs, batch, generator, device)  # subset: no group law needed
        p1, p2 = draw_position_pairs(self.neighbour_table, self.neighbour_counts, self.neighbour_period, batch,
                                     generator, device)
        if self.fibres_kind in ("positions", "scales"):
            return p1, p2
        g1, g2 = draw_pairs(self.group, self.pairs, batch, generator, device)
        positions = len(self.neighbour_counts)
        return g1 * positions + p1, g2 * positions + p2  # element-major, as position_fibres lays them out

    def fibre_pair(self, backbone: nn.Module, first: torch.Tensor, second: torch.Tensor, i1: torch.Tensor,
                   i2: torch.Tensor, pairing: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two positives (B, C) before the head, by `pairing` (default: the method's).

        fibres: z_i1(first), z_i2(first), one pass (`second` is `first`);
        augmented_fibres: z_i1(first), z_i2(second), one pass over both views;
        inputs (group fibres): z_e(T_g1 first), z_e(T_g2 second), the augmentation-SSL construction; (scale
        fibres): f(U S^k1 first), f(U S^k2 second), the CNN at full size on views coarsened by 2^k
        (data/scales.coarsen).
        """
        rows = torch.arange(len(first), device=first.device)
        pairing = pairing or self.pairing
        if pairing == "inputs" and self.fibres_kind == "scales":  # A-SSL: the CNN on coarsened full-size views
            both = torch.cat([coarsen(first, i1), coarsen(second, i2)])
            return backbone.network(IDENTITY)(both).chunk(2)
        if pairing == "inputs":
            both = torch.cat([act_on_images(first, i1, self.group), act_on_images(second, i2, self.group)])
            return self.fibres(backbone, both)[:, IDENTITY].chunk(2)
        if pairing == "fibres":
            lifted = self.fibres(backbone, first)
            return lifted[rows, i1], lifted[rows, i2]
        lifted_first, lifted_second = self.fibres(backbone, torch.cat([first, second])).chunk(2)
        return lifted_first[rows, i1], lifted_second[rows, i2]

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # fibres: one pass over the un-augmented batch x0, no augmented views at all
        first, second = (views.original, views.original) if self.pairing == "fibres" else views.global_views
        i1, i2 = self.draw(len(first), generator, first.device)
        return self.pair_losses(first, second, i1, i2)

    def pair_losses(self, first: torch.Tensor, second: torch.Tensor, i1: torch.Tensor,
                    i2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss for explicit fibre indices (forward draws them from p(G))."""
        # Heads see both positives in one batch, as SimCLR's projector sees both views (shared BN statistics).
        h1, h2 = self.projector(torch.cat(self.fibre_pair(self.backbone, first, second, i1, i2))).chunk(2)
        if self.loss_name == "nt_xent":
            return {"loss": info_nce(h1, h2, self.temperature, gather_distributed=True)}
        if self.loss_name == "vicreg":
            return vicreg(h1, h2, **self.vicreg_weights, gather_distributed=True)
        p1, p2 = self.predictor(torch.cat([h1, h2])).chunk(2)
        with torch.no_grad():  # the target reads the online mixer (the ablation's) without gradient
            t1, t2 = self.target["projector"](torch.cat(self.fibre_pair(self.target["backbone"], first, second, i1,
                                                                        i2))).chunk(2)
        return {"loss": byol_cosine(p1, t2) + byol_cosine(p2, t1)}

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The head reads one fibre, so the embedding of one view is the head on a fibre, not on pooled
        features (an input it never saw): group and scale fibres, h(z_e(x)); position fibres, the mean of h
        over the map's positions."""
        lifted = self.fibres(self.backbone, images)
        if self.fibres_kind in ("group", "scales"):  # the identity element; scales: the full-size level
            return self.projector(lifted[:, IDENTITY])
        batch, count = lifted.shape[:2]
        return self.projector(lifted.flatten(0, 1)).view(batch, count, -1).mean(dim=1)

    def after_optimizer_step(self, progress: float) -> None:
        if self.loss_name == "byol":
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
