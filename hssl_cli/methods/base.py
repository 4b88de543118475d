"""What every method is: a module holding the backbone and its heads, whose forward maps a batch of
views to a dict of named losses ("loss" is the total the engine minimises)."""

from __future__ import annotations

import torch
from torch import nn

from hssl_cli.data.augment import ViewParams
from hssl_cli.errors import HsslError


class SSLMethod(nn.Module):
    """Submodules are named after the checkpoint prefixes of DESIGN.md: backbone, projector,
    predictor, target. A method knows nothing of files, logging or devices."""

    num_views = 2
    needs_original = False  # True: forward also gets the un-augmented batch x0 (normalised), e.g. EquiMod
    closed_form = False  # True: the engine calls fit_closed_form(...) instead of running SGD

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, views: list[torch.Tensor], augmentation_params: list[ViewParams] | None = None,
                original: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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
        """The outputs collapse diagnostics measure, by checkpoint prefix: f(x), an equivariant backbone's
        lifted fibres side by side, the embedding and, where the predictor reads it, q(embedding)."""
        layers = {"backbone": self.backbone(images)}
        lifted = getattr(self.backbone, "lifted", None)
        if callable(lifted):
            layers["backbone_lifted"] = lifted(images)
        if self.has_embedding:
            layers["projector"] = self.embedding(images)
            predictor = self._modules.get("predictor")
            if predictor is not None:
                layers["predictor"] = predictor(layers["projector"])
        return layers
