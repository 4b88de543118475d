"""Homomorphic SSL (Keller, Suau & Zappella 2023): self-supervision from the structure of an equivariant
backbone instead of from input augmentations.

f(T_g x) = L_g f(x) with (L_g z)_h = z_{g^-1 h}, so a head reading the identity fibre sees
h(z_e(T_g x)) = h(z_{g^-1}(x)): the augmented pair (T_g1 x, T_g2 x) is two fibres of ONE forward pass.
Positives (h(z_g1(x)), h(z_g2(x))), g1 != g2 ~ p(G); negatives the other images' fibres; the pairwise
loss is NT-Xent, VICReg or BYOL's. `pairing: inputs` is the augmentation-SSL twin (identity fibres of
T_g1 x and T_g2 x, two passes); `structure: removed` the ablation on a non-equivariant backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.groups import Group, act_on_images
from hssl_cli.data.views import Views
from hssl_cli.errors import HsslError
from hssl_cli.losses import byol_cosine, info_nce, vicreg
from hssl_cli.methods.base import SSLMethod, random_integers
from hssl_cli.methods.byol import make_target, target_momentum, update_target
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import HSSLPairsConfig, ModelConfig, Recipe

IDENTITY = 0  # index of the identity element in every group of data/groups.py


def draw_pairs(group: Group, pairs: HSSLPairsConfig, batch: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair g1 != g2 ~ p(G) per image, from the step's generator."""
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


def lifted_features(backbone: nn.Module, images: torch.Tensor, group: Group) -> torch.Tensor:
    """z(x): (B, |G|, C). Equivariant backbones (and their plain twins) say which channels form fibre g;
    any other backbone's features are cut into |G| consecutive pseudo-fibres."""
    if hasattr(backbone, "lifted"):
        return backbone.lifted(images)
    features = backbone(images)
    return features.view(len(features), group.size, -1)


def fibre_pair(backbone: nn.Module, first: torch.Tensor, second: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
               group: Group, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two positives (B, C) before the head.

    fibres: z_g1(first), z_g2(first), one pass (`second` is `first`);
    augmented_fibres: z_g1(first), z_g2(second), one pass over both views;
    inputs: z_e(T_g1 first), z_e(T_g2 second), the augmentation-SSL construction.
    """
    rows = torch.arange(len(first), device=first.device)
    if pairing == "inputs":
        both = torch.cat([act_on_images(first, g1, group), act_on_images(second, g2, group)])
        return lifted_features(backbone, both, group)[:, IDENTITY].chunk(2)
    if pairing == "fibres":
        lifted = lifted_features(backbone, first, group)
        return lifted[rows, g1], lifted[rows, g2]
    lifted_first, lifted_second = lifted_features(backbone, torch.cat([first, second]), group).chunk(2)
    return lifted_first[rows, g1], lifted_second[rows, g2]


class HSSL(SSLMethod):
    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        model, config = recipe.model, recipe.method
        self.group = Group(model.group.name, model.group.order)
        self.pairing, self.loss_name, self.pairs = config.pairing, config.loss, config.pairs
        self.projector = mlp(self._fibre_dim(backbone, model), model.projector)  # the shared head h
        self.temperature = config.temperature
        self.vicreg_weights = {"invariance_weight": config.invariance_weight,
                               "variance_weight": config.variance_weight,
                               "covariance_weight": config.covariance_weight}
        if config.loss == "byol":
            self.predictor = mlp(model.projector[-1], config.predictor)
            self.target = make_target(backbone, self.projector)
            self.ema_start = config.ema_start

    def _fibre_dim(self, backbone: nn.Module, model: ModelConfig) -> int:
        if hasattr(backbone, "lifted"):
            return backbone.feature_dim
        if backbone.feature_dim % self.group.size:
            raise HsslError(f"model.backbone '{model.backbone}' gives {backbone.feature_dim} features, which do not "
                            f"split into |G| = {self.group.size} pseudo-fibres; pick a group whose size divides it")
        return backbone.feature_dim // self.group.size

    @classmethod
    def from_recipe(cls, recipe: Recipe, in_channels: int) -> HSSL:
        from hssl_cli.models.backbones import build_backbone

        # structure removed: the ablation's backbone, the layout without equivariance
        return cls(build_backbone(recipe.model, in_channels, plain=recipe.method.structure == "removed"), recipe)

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # fibres: one pass over the un-augmented batch x0, no augmented views at all
        first, second = (views.original, views.original) if self.pairing == "fibres" else views.global_views
        g1, g2 = draw_pairs(self.group, self.pairs, len(first), generator, first.device)
        return self.pair_losses(first, second, g1, g2)

    def pair_losses(self, first: torch.Tensor, second: torch.Tensor, g1: torch.Tensor,
                    g2: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss for explicit group elements (forward draws them from p(G))."""
        # Heads see both positives in one batch, as SimCLR's projector sees both views (shared BN statistics).
        h1, h2 = self.projector(torch.cat(fibre_pair(self.backbone, first, second, g1, g2, self.group,
                                                     self.pairing))).chunk(2)
        if self.loss_name == "nt_xent":
            return {"loss": info_nce(h1, h2, self.temperature, gather_distributed=True)}
        if self.loss_name == "vicreg":
            return vicreg(h1, h2, **self.vicreg_weights, gather_distributed=True)
        p1, p2 = self.predictor(torch.cat([h1, h2])).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target["projector"](torch.cat(fibre_pair(self.target["backbone"], first, second, g1, g2,
                                                                   self.group, self.pairing))).chunk(2)
        return {"loss": byol_cosine(p1, t2) + byol_cosine(p2, t1)}

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """h(z_e(x)): the head reads one fibre, so the embedding of one view is the head on its identity
        fibre (not on the group-pooled features, an input the head never saw)."""
        return self.projector(lifted_features(self.backbone, images, self.group)[:, IDENTITY])

    def after_optimizer_step(self, progress: float) -> None:
        if self.loss_name == "byol":
            update_target(self.target, self.backbone, self.projector, target_momentum(progress, self.ema_start))
