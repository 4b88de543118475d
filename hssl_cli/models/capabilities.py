"""What a backbone has beyond images -> pooled features (B, feature_dim), declared where it is built: lifted
fibres over a group, scale levels, a spatial map, a library twin to export to. Methods and checks ask this
declaration instead of probing for attributes, so a missing capability is named where it is needed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from hssl_cli.data.groups import Group
from hssl_cli.errors import RecipeError

# Where models/spatial.py reads the unpooled map (B, C, h, w): resnet_stages, a torchvision ResNet's stages
# (layer3, layer4 = last); features, SmallConvNet's conv stack; layer_outputs, an e2_* backbone's last stage;
# forward_features, timm's (a map for CNNs, tokens for transformers, which spatial.py refuses); full_size_level,
# the level-0 network of a multi-scale lifting; token_grid, the patch tokens of a block of hssl's vit (models/vit.py).
SpatialMap = Literal["resnet_stages", "features", "layer_outputs", "forward_features", "full_size_level",
                     "token_grid"]


@dataclass(frozen=True)
class BackboneCapabilities:
    """One backbone's declaration; the defaults are a backbone that has none of these."""

    group: Group | None = None  # lifted(images) -> (B, |G|, C), fibre g = field g; maps field-major (C |G| channels)
    # its layers commute with its lifting: with `group`'s elements (then layer_outputs()) or with the down-scalings
    # between its scale levels; False for a structure-removed twin, which has the layout without the symmetry
    equivariant: bool = False
    scale_levels: int | None = None  # lifted(images) -> (B, K, C) and stage_outputs(images, k): a scale lifting
    spatial_map: SpatialMap | None = None
    # a transformer whose tokens carry absolute position embeddings: its token grid promises no translation
    position_embedding: bool = False
    library_twins: tuple[str, ...] = ()  # libraries whose own model loads its state_dict strictly (hssl export)
    # the library model's classifier, removed here (dotted module names): a library weights file carries it, and
    # --init-from leaves its tensors out
    library_classifier: tuple[str, ...] = ()

    @property
    def lifted(self) -> bool:
        """Whether lifted(images) gives fibres (of group elements or of scale levels)."""
        return self.group is not None or self.scale_levels is not None

    def needs_group(self, needed_by: str) -> Group:
        if self.group is None:
            raise RecipeError(f"{needed_by} reads the fibres of a group, which this model.backbone does not lift; "
                              "use an e2_* backbone (e2_convnet, e2_resnet18) with model.group")
        return self.group

    def needs_scale_levels(self, needed_by: str) -> int:
        if self.scale_levels is None:
            raise RecipeError(f"{needed_by} reads scale levels, which this backbone does not have; set model.scales, "
                              "e.g. scales: {levels: 3}")
        return self.scale_levels


def capabilities_of(backbone: nn.Module) -> BackboneCapabilities:
    """The declaration every backbone carries from where it is built (models/, the kernel method's feature map)."""
    try:
        declared = backbone.capabilities
    except AttributeError:  # a bug: a backbone built outside build_backbone without a declaration
        raise TypeError(f"{type(backbone).__name__} declares no capabilities; give it a `capabilities` "
                        "attribute (models/capabilities.py: BackboneCapabilities) where it is built") from None
    if not isinstance(declared, BackboneCapabilities):
        raise TypeError(f"{type(backbone).__name__}.capabilities is a {type(declared).__name__}, "
                        "not a BackboneCapabilities")
    return declared
