"""The base of every method config (`MethodSection`), what a method reads each step (`Consumes`), and the
cross-field checks several methods share. The configs themselves are in `methods` and `equivariant_methods`."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from hssl_cli.recipe.sections import Section

if TYPE_CHECKING:
    from hssl_cli.recipe.schema import Recipe


class Consumes(NamedTuple):
    """What a method reads each step: how many global views, whether it takes local (multi-crop) views,
    whether it also reads the un-augmented batch x0. The engine draws exactly these."""

    global_views: int = 2
    local_views: bool = False
    original: bool = False


class MethodSection(Section):
    """The base of every method config: what the method consumes, the heads it adds, the loss it offers a
    choice of, and its cross-field checks."""

    @property
    def consumes(self) -> Consumes:
        return Consumes()

    @property
    def loss_variant(self) -> str | None:
        """The loss a method offers a choice of, where it offers one (e.g. DirectPred's byol | iso)."""
        return None

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        """The MLP heads the method adds beside the projector, as {recipe key: widths from input to output};
        `projector_width` is the projector's output width, `feature_width` the backbone's features (a bound)."""
        return {}

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError (naming the keys) when this method cannot run with the rest of `recipe`."""


def check_predictor_width(predictor: list[int], recipe: Recipe) -> None:
    """A predictor maps the projector's output back to its own width: its last layer must match it."""
    if predictor[-1] != recipe.model.projector[-1]:
        raise ValueError(f"method.predictor must end in the projector's width {recipe.model.projector[-1]}, "
                         f"got {predictor[-1]}")


def require_equivariant_backbone(recipe: Recipe) -> None:
    if not recipe.model.backbone.startswith("e2_"):
        raise ValueError(f"method.name={recipe.method.name} needs an equivariant backbone: set model.backbone to "
                         "e2_convnet or e2_resnet18 and model.group")
