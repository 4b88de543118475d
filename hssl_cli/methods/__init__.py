"""Methods by their recipe name (`method.name`)."""

from __future__ import annotations

from hssl_cli.methods.base import SSLMethod
from hssl_cli.recipe import Recipe


def build_method(recipe: Recipe, in_channels: int) -> SSLMethod:
    """The recipe's method around a freshly initialised backbone (seeded by the caller)."""
    from hssl_cli.methods.byol import BYOL
    from hssl_cli.methods.simclr import SimCLR
    from hssl_cli.methods.vicreg import VICReg
    from hssl_cli.models.backbones import build_backbone

    methods = {"simclr": SimCLR, "byol": BYOL, "vicreg": VICReg}
    backbone = build_backbone(recipe.model.backbone, in_channels)
    return methods[recipe.method.name](backbone, recipe.model, recipe.method)
