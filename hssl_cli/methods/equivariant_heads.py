"""SSL for G-equivariant networks: an equivariant rotation/flip pretext task and the invariant InfoNCE.

Both read the lifted features z(x) in R^{|G| x C} of an e2_* backbone (`backbone.lifted`, over the group its
capabilities declare), and apply heads fibre by fibre, which commutes with the fibre permutation L_g and so keeps
the equivariance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hssl_cli.data.groups import Group, act_on_images
from hssl_cli.data.views import Views
from hssl_cli.losses import info_nce, invariant_info_nce
from hssl_cli.methods.base import SSLMethod, random_integers
from hssl_cli.models.capabilities import capabilities_of
from hssl_cli.models.heads import mlp
from hssl_cli.recipe import Recipe


def per_fibre(head: nn.Module, lifted: torch.Tensor) -> torch.Tensor:
    """h applied to every fibre: (B, |G|, C) -> (B, |G|, D)."""
    batch, group_size, channels = lifted.shape
    return head(lifted.reshape(batch * group_size, channels)).view(batch, group_size, -1)


def random_elements(batch: int, group: Group, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """g ~ U(G), one per image."""
    return random_integers(0, group.size, batch, generator, device)


class EquivariantPretext(SSLMethod):
    """Predict g from T_g x: logits_h(x) = w . z_h(x), so logits(T_g x) = P_g logits(x) exactly, and the
    cross-entropy target g = g . e is reachable by an exactly equivariant network. `head: invariant` is
    plain rotation prediction from the group-pooled features f(x) = max_h z_h(x): f(T_g x) = f(x), so
    every g gets the same logits and the loss cannot fall below log |G|. `head: flattened`: logits = W vec z(x),
    any linear map of the fibres side by side (the equivariant head is the special case W = I (x) w).
    `structure: removed` trains on the plain twin of the backbone (RotNet on a CNN of the same width)."""

    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        # an e2_* backbone or its plain twin (the config's check)
        self.group: Group = capabilities_of(backbone).needs_group(f"method {config.name}")
        self.head = config.head
        # equivariant: one logit per fibre, shared over fibres; invariant: |G| logits from the pooled features;
        # flattened: |G| logits from the |G| C lifted features
        inputs = backbone.feature_dim * (self.group.size if self.head == "flattened" else 1)
        self.classifier = nn.Linear(inputs, 1 if self.head == "equivariant" else self.group.size)
        self.contrastive_weight = config.contrastive_weight
        self.temperature = config.temperature
        if config.contrastive_weight > 0:
            self.projector = mlp(backbone.feature_dim, recipe.model.projector)

    @classmethod
    def from_recipe(cls, recipe: Recipe, in_channels: int) -> EquivariantPretext:
        from hssl_cli.models.backbones import build_backbone

        return cls(build_backbone(recipe.model, in_channels, plain=recipe.method.structure == "removed",
                                   image_size=recipe.data.image_size), recipe)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, |G|) rotation/flip logits; equivariant head: logits(T_g x) = P_g logits(x)."""
        if self.head == "invariant":
            return self.classifier(self.backbone(images))
        if self.head == "flattened":
            return self.classifier(self.backbone.lifted(images).flatten(1))
        return per_fibre(self.classifier, self.backbone.lifted(images)).squeeze(-1)

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        first = views.global_views[0]
        elements = random_elements(len(first), self.group, generator, first.device)
        logits = self.logits(act_on_images(first, elements, self.group))
        pretext = F.cross_entropy(logits, elements)
        accuracy = (logits.detach().argmax(dim=1) == elements).float().mean()  # logged: 1/|G| is chance
        if self.contrastive_weight == 0:
            return {"loss": pretext, "pretext/accuracy": accuracy}
        z1, z2 = self.projector(self.backbone(torch.cat(views.global_views))).chunk(2)
        contrastive = info_nce(z1, z2, self.temperature, gather_distributed=True)
        return {"loss": pretext + self.contrastive_weight * contrastive, "loss/pretext": pretext,
                "loss/contrastive": contrastive, "pretext/accuracy": accuracy}


class InvariantContrastive(SSLMethod):
    """InfoNCE with sim(u, v) = max_g cos(u, rho(g) v) between per-fibre embeddings of two views."""

    def __init__(self, backbone: nn.Module, recipe: Recipe):
        super().__init__(backbone)
        config = recipe.method
        self.group: Group = capabilities_of(backbone).needs_group(f"method {config.name}")  # the config's check
        self.projector = mlp(backbone.feature_dim, recipe.model.projector)  # applied per fibre
        self.temperature = config.temperature
        self.soft_temperature = config.soft_temperature if config.similarity == "logsumexp" else None
        self.plain = config.similarity == "plain"
        self.transform_views = config.transform_views
        self.register_buffer("fibre_permutations", self.group.fibre_permutation(torch.arange(self.group.size)),
                             persistent=False)

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        images = views.global_views
        if self.transform_views:
            images = [act_on_images(view, random_elements(len(view), self.group, generator, view.device), self.group)
                      for view in images]
        u, v = per_fibre(self.projector, self.backbone.lifted(torch.cat(images))).chunk(2)
        if self.plain:
            return {"loss": info_nce(u.flatten(1), v.flatten(1), self.temperature, gather_distributed=True)}
        return {"loss": invariant_info_nce(u, v, self.fibre_permutations, self.temperature,
                                           self.soft_temperature, gather_distributed=True)}

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The per-fibre embeddings the invariant similarity compares, side by side: (B, |G| D)."""
        return per_fibre(self.projector, self.backbone.lifted(images)).flatten(1)
