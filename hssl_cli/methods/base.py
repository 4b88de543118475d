"""What every method is: a module holding the backbone and its heads, built from the recipe, whose forward
maps one step's `Views` (and the step's seeded generator) to a dict of named losses ("loss" is the total
the engine minimises). What it reads (global views, local views, x0) its config declares (`consumes`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from hssl_cli.errors import HsslError
from hssl_cli.models.capabilities import capabilities_of

if TYPE_CHECKING:
    from hssl_cli.data.views import Views
    from hssl_cli.recipe import Recipe


class SSLMethod(nn.Module):
    """Submodules are named after the checkpoint prefixes of DESIGN.md: backbone, projector, predictor,
    target. A method knows nothing of files, logging or devices, and draws randomness only from the
    generator it is given."""

    closed_form = False  # True: the engine calls fit_closed_form(...) instead of running SGD

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @classmethod
    def from_recipe(cls, recipe: Recipe, in_channels: int) -> SSLMethod:
        """The method around a freshly initialised backbone (the caller seeds torch for the weights)."""
        from hssl_cli.models.backbones import build_backbone

        return cls(build_backbone(recipe.model, in_channels, image_size=recipe.data.image_size), recipe)

    def forward(self, views: Views, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def start_from_backbone_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the backbone's initial weights (`--init-from` a backbone weights file; `tensors` fit its
        state_dict exactly). An EMA target's backbone (`target.`, a copy of the online one at initialisation:
        methods/byol.py make_target) becomes a copy of them again, so the run starts as if built from them."""
        self.backbone.load_state_dict(tensors, strict=True)
        target = self._modules.get("target")
        if target is not None:
            target["backbone"].load_state_dict(self.backbone.state_dict(), strict=True)

    def after_optimizer_step(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done (e.g. for EMA targets)."""

    def fit_closed_form(self, images: torch.Tensor, augmenter, generator: torch.Generator) -> dict[str, float]:
        """For closed_form methods: solve the objective on uint8 `images` (on the device); return metrics."""
        raise NotImplementedError

    @property
    def has_embedding(self) -> bool:
        """Whether the method has an embedding beyond the backbone features (a projector)."""
        return "projector" in self._modules

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding of one view as the loss sees it: z = g(f(x)). Methods whose head reads something
        else than f(x) (one fibre, every fibre) override it; probes of "projector" features use it."""
        if not self.has_embedding:
            raise HsslError(f"the {type(self).__name__} model has no projector, so no embedding beyond the "
                            "backbone features; use --features backbone")
        return self.projector(self.backbone(images))

    def collapse_layers(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs collapse diagnostics measure, by checkpoint prefix: f(x), a lifted backbone's fibres (group
        elements or scale levels) side by side, the embedding and, where the predictor reads it, q(embedding)."""
        layers = {"backbone": self.backbone(images)}
        if capabilities_of(self.backbone).lifted:
            layers["backbone_lifted"] = self.backbone.lifted(images)
        if self.has_embedding:
            layers["projector"] = self.embedding(images)
            predictor = self._modules.get("predictor")
            if predictor is not None:
                layers["predictor"] = predictor(layers["projector"])
        return layers


def random_integers(low: int, high: int, count: int, generator: torch.Generator, device: torch.device
                    ) -> torch.Tensor:
    """`count` integers uniform in [low, high): the one way a method draws (group elements, pairs)."""
    return torch.randint(low, high, (count,), generator=generator, device=device)


def random_permutation(count: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A uniformly random permutation of range(count), from the step's generator."""
    return torch.randperm(count, generator=generator, device=device)


class ViewFeatures:
    """f of every view of a step: one backbone pass over the global views and x0 (one size), one over the
    local views (another size), split back per view."""

    def __init__(self, backbone: nn.Module, views: Views):
        inputs = [*views.global_views, *([views.original] if views.original is not None else [])]
        features = list(backbone(torch.cat(inputs)).chunk(len(inputs)))
        self.global_features = features[:len(views.global_views)]
        self.original = features[-1] if views.original is not None else None
        self.local_features = (list(backbone(torch.cat(views.local_views)).chunk(len(views.local_views)))
                               if views.local_views else [])


def project_views(projector: nn.Module, features: ViewFeatures) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """g of every global and local view in one pass (one set of BatchNorm statistics), split back."""
    everything = [*features.global_features, *features.local_features]
    embeddings = list(projector(torch.cat(everything)).chunk(len(everything)))
    count = len(features.global_features)
    return embeddings[:count], embeddings[count:]


def mean_over_view_pairs(global_embeddings: list[torch.Tensor], local_embeddings: list[torch.Tensor],
                         pair_loss: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """Multi-crop: the mean of `pair_loss` over every pair of global views and every (global, local) pair
    (Caron et al. 2020); with two global views and no local ones, `pair_loss` of the pair itself."""
    count = len(global_embeddings)
    pairs = [(global_embeddings[i], global_embeddings[j]) for i in range(count) for j in range(i + 1, count)]
    pairs += [(first, local) for first in global_embeddings for local in local_embeddings]
    terms = [pair_loss(first, second) for first, second in pairs]
    if len(terms) == 1:
        return terms[0]
    return {name: torch.stack([term[name] for term in terms]).mean() for name in terms[0]}


def loss_over_target_pairs(online: list[torch.Tensor], targets: list[torch.Tensor],
                           pair_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Multi-crop for the methods whose online view predicts a target (BYOL, SimSiam, DirectPred, MoCo v3):
    `pair_loss(online[v], targets[i])` for every online view v (the G global views first, then the local ones)
    and the target of every global view i != v (`targets`: G, the global views' only)."""
    if not 1 <= len(targets) <= len(online) or len(online) < 2:
        raise ValueError(f"loss_over_target_pairs: expected G >= 1 targets and V >= max(G, 2) online views, got "
                         f"G = {len(targets)}, V = {len(online)}")
    terms = [pair_loss(view, target) for v, view in enumerate(online) for i, target in enumerate(targets) if i != v]
    # L = (2 / P) sum_{v, i != v} l(o_v, t_i) over the P pairs: their mean, scaled so that 2 views give
    # l(o_1, t_2) + l(o_2, t_1), the symmetrised loss of the papers (and of hssl before multi-crop), exactly
    return torch.stack(terms).sum() * (2 / len(terms))
