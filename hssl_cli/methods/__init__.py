"""Methods by their recipe name (`method.name`): each builds itself from the recipe (`from_recipe`)."""

from __future__ import annotations

from hssl_cli.methods.barlow_twins import BarlowTwins
from hssl_cli.methods.base import SSLMethod
from hssl_cli.methods.byol import BYOL
from hssl_cli.methods.dino import DINO
from hssl_cli.methods.directpred import DirectPred
from hssl_cli.methods.equivariant_heads import EquivariantPretext, InvariantContrastive
from hssl_cli.methods.hssl import HSSL
from hssl_cli.methods.kernel import KernelMethod
from hssl_cli.methods.mocov3 import MoCoV3
from hssl_cli.methods.simclr import SimCLR
from hssl_cli.methods.vicreg import VICReg
from hssl_cli.recipe import Recipe

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR, "byol": BYOL, "vicreg": VICReg, "barlow_twins": BarlowTwins, "mocov3": MoCoV3,
    "directpred": DirectPred, "directcopy": DirectPred, "kernel": KernelMethod, "hssl": HSSL,
    "equivariant_pretext": EquivariantPretext, "invariant_contrastive": InvariantContrastive,
    "dino": DINO,
}


def build_method(recipe: Recipe, in_channels: int) -> SSLMethod:
    """The recipe's method around a freshly initialised backbone (seeded by the caller)."""
    return METHODS[recipe.method.name].from_recipe(recipe, in_channels)
