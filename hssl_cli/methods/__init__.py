"""Methods by their recipe name (`method.name`)."""

from __future__ import annotations

from hssl_cli.methods.base import SSLMethod
from hssl_cli.recipe import Recipe


def build_method(recipe: Recipe, in_channels: int) -> SSLMethod:
    """The recipe's method around a freshly initialised backbone (seeded by the caller)."""
    if recipe.method.name == "kernel":  # sized by the data (support points, pixels), not by a backbone
        from hssl_cli.methods.kernel import KernelMethod

        return KernelMethod(recipe, in_channels)
    from hssl_cli.methods.byol import BYOL
    from hssl_cli.methods.directpred import DirectPred
    from hssl_cli.methods.equivariant_heads import EquivariantPretext, InvariantContrastive
    from hssl_cli.methods.hssl import HSSL
    from hssl_cli.methods.simclr import SimCLR
    from hssl_cli.methods.vicreg import VICReg
    from hssl_cli.models.backbones import build_backbone

    methods = {"simclr": SimCLR, "byol": BYOL, "vicreg": VICReg, "directpred": DirectPred, "directcopy": DirectPred,
               "hssl": HSSL, "equivariant_pretext": EquivariantPretext, "invariant_contrastive": InvariantContrastive}
    structure_removed = getattr(recipe.method, "structure", "kept") == "removed"  # H-SSL's ablation
    backbone = build_backbone(recipe.model, in_channels, plain=structure_removed)
    equimod = getattr(recipe.method, "equimod", None)
    if equimod is not None:  # SimCLR/BYOL + EquiMod: the branch needs the augmentation distribution
        from hssl_cli.methods.equimod import EquiModBranch

        branch = EquiModBranch(backbone.feature_dim, equimod, recipe.augment, recipe.data.image_size)
        return methods[recipe.method.name](backbone, recipe.model, recipe.method, equimod=branch)
    return methods[recipe.method.name](backbone, recipe.model, recipe.method)
