"""The config of E-SSL's rotation-prediction branch (`method.essl:` of SimCLR and BYOL) and what it adds to its
base method's consumes and heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from hssl_cli.recipe.sections import Section, Width

if TYPE_CHECKING:
    from hssl_cli.recipe.schema import Recipe


class EsslConfig(Section):
    """E-SSL (Dangovski et al. 2022): the backbone's features also predict which of the four quarter-turns
    rotated an image; L = L_ssl + lambda L_rot with L_rot the cross-entropy of a small head's four logits."""

    weight: float = Field(0.4, ge=0, description="lambda in L = L_ssl + lambda L_rot (the paper's 0.4 for SimCLR "
                          "on CIFAR-10)")
    head: list[Width] = Field([2048, 2048], description="hidden widths of the rotation head h (Linear-LayerNorm-ReLU "
                              "each, as in the paper's code), then a Linear to the 4 rotations; [] is a linear head")
    views: Literal["local", "global", "original"] = Field(
        "local", description="the images the branch rotates. local: the recipe's local views, which then feed this "
        "branch only and not the base loss: the paper's own separately augmented views (its CIFAR-10 code: one crop "
        "at half data.image_size, the global views' augmentation), e.g. views: [{}, {}, {size: 16}]; global: the "
        "global views themselves (no extra draw); original: the un-augmented batch x0")
    rotations: Literal["all", "one"] = Field(
        "all", description="all: every image in each of the four rotations, labels 0-3 (the paper's code: 4 passes "
        "of each image); one: one rotation per image, drawn from the step's generator (a quarter of the passes)")

    def check(self, recipe: Recipe) -> None:
        if self.views != "local":
            return
        sizes = {view.size for view in recipe.resolved_views() if view.role == "local"}
        if len(sizes) != 1:
            found = f"local views at sizes {sorted(sizes)}" if sizes else "no local views"
            raise ValueError(f"method.essl.views=local rotates the recipe's local views, which must share one size; "
                             f"views: has {found}. List them at one size, e.g. views: [{{}}, {{}}, {{size: "
                             f"{recipe.data.image_size // 2}}}] (the paper's), or set method.essl.views: global")


def essl_reads(essl: EsslConfig | None, views: str) -> bool:
    return essl is not None and essl.views == views


def essl_heads(essl: EsslConfig | None, feature_width: int) -> dict[str, list[int]]:
    return {} if essl is None else {"method.essl.head": [feature_width, *essl.head, 4]}
