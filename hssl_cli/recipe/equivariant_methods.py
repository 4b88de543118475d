"""Method configs (`method:`) for the equivariant-network methods: H-SSL (with its pair distribution), the
equivariant pretext task and the invariant contrastive loss. `methods` holds the others and `MethodConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from hssl_cli.recipe.method_base import (
    Consumes,
    MethodSection,
    check_predictor_width,
    require_equivariant_backbone,
)
from hssl_cli.recipe.sections import Section, ViTConfig, Width

if TYPE_CHECKING:
    from hssl_cli.recipe.schema import Recipe


class HSSLPairsConfig(Section):
    """p(G): how each image's pair g1 != g2 is drawn; it plays the augmentation distribution's role."""

    distribution: Literal["uniform", "neighbourhood", "subset"] = Field(
        "uniform", description="uniform: any g1 != g2; neighbourhood: g2 is g1 rotated by 1..max_steps steps "
        "either way (a weaker augmentation); for position fibres, p2 within max_steps of p1 on the map's grid "
        "(Chebyshev distance: like a small crop offset); subset: g1 != g2 both from elements")
    max_steps: int = Field(1, ge=1, le=64, description="neighbourhood: largest relative rotation, in steps of 360/N, "
                           "or largest offset between two positions, in map cells")
    elements: list[Annotated[int, Field(ge=0, le=127)]] | None = Field(
        None, description="subset: element indices, k = rotation by k*360/N, N+k = horizontal flip then it")


class HSSLConfig(MethodSection):
    """Homomorphic SSL (Keller et al. 2023): positives are two fibres z_g1(x), z_g2(x) of one forward pass
    of an equivariant backbone, through one shared head; negatives are the other images' fibres."""

    name: Literal["hssl"] = "hssl"
    loss: Literal["nt_xent", "vicreg", "byol"] = Field("nt_xent", description="pairwise loss on the two fibres")
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature tau (loss: nt_xent)")
    pairs: HSSLPairsConfig = Field(default_factory=HSSLPairsConfig)
    pairing: Literal["fibres", "augmented_fibres", "inputs"] = Field(
        "augmented_fibres", description="augmented_fibres: z_g1(t1 x), z_g2(t2 x) with t from augment: (the base "
        "augmentation a fair comparison shares); fibres: z_g1(x), z_g2(x) of one pass, no other augmentation "
        "(instance discrimination between near-identical fibres); inputs: the augmentation-SSL twin, identity "
        "fibres of T_g1 t1 x and T_g2 t2 x; with fibres: scales, the CNN on t1 x and t2 x coarsened to levels k1 "
        "and k2 at the input size (every 2^k block replaced by its mean), since the lifting's own S^k x would be "
        "fibre k itself")
    structure: Literal["kept", "shuffled", "removed", "mixed"] = Field(
        "kept", description="shuffled: the ablation that changes only the structure: the same backbone, its F x C "
        "fibre entries permuted by a fixed random permutation and cut back into F pseudo-fibres, so no pseudo-fibre "
        "is the feature of a transformed input (every fibre kind). removed: the ablation on another architecture; "
        "group fibres: the backbone's layout without equivariance (a plain CNN twin), its channels split into |G| "
        "pseudo-fibres; scale fibres: K unshared copies of the CNN on the un-scaled image; position fibres: the map's "
        "entries shuffled as by shuffled, on the plain twin for an e2_* backbone. mixed (position fibres): positions "
        "mixed by a learned dense layer over the map (MLP-Mixer-like token mixing); measured to act as a soft crop, "
        "not as a removal")
    fibres: Literal["group", "positions", "group_and_positions", "scales"] = Field(
        "group", description="group: the |G| fibres of model.group (rotations, flips), pooled over space; positions: "
        "the h x w positions of a convolutional map (translation H-SSL, any CNN backbone: the homomorphic "
        "counterpart of random crops); group_and_positions: both (roto-translations, e2_* backbones); scales: the "
        "K levels of model.scales (the image down-scaled by 2^k, shared weights)")
    fibres_from: str = Field(
        "last", pattern=r"^(last|layer3|layer4|block\d{1,2})$", description="position fibres: the map they are "
        "read from; last: the last map before pooling (resnet18_cifar: layer4; vit: the last block's patch "
        "tokens); layer3: ResNet's third stage (twice the grid); block<k>: the patch tokens after block k of a vit "
        "(0-based), the class token left out")
    predictor: list[Width] = Field(
        [512, 128], min_length=1, description="loss byol: widths of the predictor q; the last equals the projector's")
    ema_start: float = Field(0.99, ge=0, lt=1, description="loss byol: tau_0 of the target EMA, raised to 1")
    invariance_weight: float = Field(25.0, ge=0, description="loss vicreg: lambda (invariance)")
    variance_weight: float = Field(25.0, ge=0, description="loss vicreg: mu (variance hinge)")
    covariance_weight: float = Field(1.0, ge=0, description="loss vicreg: nu (covariance)")

    @property
    def consumes(self) -> Consumes:
        # fibres: one pass over the un-augmented batch, no augmented views at all
        return Consumes(global_views=0, original=True) if self.pairing == "fibres" else Consumes()

    @property
    def loss_variant(self) -> str | None:
        return self.loss

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        # declared whatever the loss, as the memory bound has always counted it (only loss byol builds it)
        return {"method.predictor": [projector_width, *self.predictor]}

    def check(self, recipe: Recipe) -> None:
        model = recipe.model
        if self.structure == "mixed" and self.fibres not in ("positions", "group_and_positions"):
            raise ValueError(f"method.structure: mixed mixes map positions; fibres: {self.fibres} has none (use "
                             "structure: removed for the ablation)")
        if self.fibres == "positions":
            self._check_positions(recipe)
            return
        if self.fibres == "scales":
            self._check_scales(recipe)
            return
        if model.group is None:
            raise ValueError("model.group is required for method hssl (it pairs the group's fibres); "
                             "e.g. group: {name: C, order: 8}; for translation H-SSL on any CNN set "
                             "method.fibres: positions")
        if self.fibres == "group_and_positions":
            self._check_positions(recipe)
        if self.structure != "removed" and not model.backbone.startswith("e2_"):
            raise ValueError(f"method.structure '{self.structure}' needs an equivariant model.backbone (e2_convnet, "
                             f"e2_resnet18), got '{model.backbone}'; for the ablation set method.structure: removed")
        size = model.group.order * (2 if model.group.name == "D" else 1)
        pairs = self.pairs
        if pairs.distribution == "subset" and (pairs.elements is None or len(set(pairs.elements)) < 2
                                               or max(pairs.elements) >= size):
            raise ValueError(f"method.pairs.elements: subset needs at least two distinct indices below |G| = {size}, "
                             f"got {pairs.elements}")
        if pairs.distribution == "neighbourhood" and 2 * pairs.max_steps > model.group.order:
            raise ValueError(f"method.pairs.max_steps={pairs.max_steps} exceeds half of N={model.group.order}; "
                             "use distribution: uniform")
        if size < 2:
            raise ValueError("model.group: H-SSL needs at least two group elements to pair")
        if self.loss == "byol":
            check_predictor_width(self.predictor, recipe)

    def _check_scales(self, recipe: Recipe) -> None:
        if recipe.model.scales is None:
            raise ValueError("method.fibres: scales pairs the levels of a multi-scale lifting; set model.scales, e.g. "
                             "scales: {levels: 3}")
        if self.pairing == "inputs" and self.structure != "kept":
            raise ValueError(f"method.pairing: inputs with fibres: scales is the A-SSL twin (one CNN on coarsened "
                             f"views, no fibres), so structure '{self.structure}' would change nothing; set "
                             "structure: kept, or pairing: augmented_fibres for the ablation")
        levels, pairs = recipe.model.scales.levels, self.pairs
        if pairs.distribution == "subset" and (pairs.elements is None or len(set(pairs.elements)) < 2
                                               or max(pairs.elements) >= levels):
            raise ValueError(f"method.pairs.elements: subset needs at least two distinct levels below "
                             f"model.scales.levels = {levels}, got {pairs.elements}")
        if pairs.distribution == "neighbourhood" and pairs.max_steps >= levels:
            raise ValueError(f"method.pairs.max_steps={pairs.max_steps}: levels are at most {levels - 1} apart; use "
                             "distribution: uniform")
        if self.loss == "byol":
            check_predictor_width(self.predictor, recipe)

    def _check_positions(self, recipe: Recipe) -> None:
        if self.pairing == "inputs":
            raise ValueError(f"method.pairing: inputs with fibres: {self.fibres}; the augmentation twin of position "
                             "fibres is random crops: method simclr with augment.crop_scale")
        if self.pairs.distribution == "subset":
            raise ValueError("method.pairs.distribution: subset names group elements; position pairs are uniform "
                             "or neighbourhood")
        self._check_fibres_from(recipe)
        if self.loss == "byol":
            check_predictor_width(self.predictor, recipe)

    def _check_fibres_from(self, recipe: Recipe) -> None:
        backbone, source = recipe.model.backbone, self.fibres_from
        if source.startswith("block"):
            depth = (recipe.model.vit or ViTConfig()).depth
            if backbone != "vit" or int(source[5:]) >= depth:
                raise ValueError(f"method.fibres_from: {source} is a block of a vit; model.backbone {backbone} "
                                 + (f"has blocks block0 .. block{depth - 1}" if backbone == "vit" else
                                    "has no blocks (fibres_from: last)"))
        elif source != "last" and not backbone.startswith(("resnet", "torchvision:resnet")):
            raise ValueError(f"method.fibres_from: {source} is a ResNet stage; {backbone} has only its last map "
                             "(fibres_from: last)")


class EquivariantPretextConfig(MethodSection):
    """Rotation (and, for D_N, flip) prediction with an equivariant head on an e2_* backbone: the logit of
    element h reads fibre h, so logits(T_g x) = P_g logits(x); the target of T_g x is g (= g . e)."""

    name: Literal["equivariant_pretext"] = "equivariant_pretext"
    head: Literal["equivariant", "invariant", "flattened"] = Field(
        "equivariant", description="equivariant: logit h reads fibre h; invariant: plain rotation prediction, a "
        "linear classifier on the group-pooled features, which an invariant backbone cannot solve (a sanity check); "
        "flattened: a linear classifier on every fibre side by side (|G| C inputs), which can solve the task "
        "without being equivariant (the head the equivariant one is compared with)")
    structure: Literal["kept", "removed"] = Field(
        "kept", description="removed: the backbone's plain twin (the same layout and width with ordinary "
        "convolutions; no equivariance); with head: flattened this is rotation prediction on a plain CNN (RotNet)")
    contrastive_weight: float = Field(0.0, ge=0, description="weight of an added NT-Xent on two augmented views")
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature of the contrastive term")

    @property
    def consumes(self) -> Consumes:
        return Consumes(global_views=2 if self.contrastive_weight > 0 else 1)

    def check(self, recipe: Recipe) -> None:
        require_equivariant_backbone(recipe)


class InvariantContrastiveConfig(MethodSection):
    """InfoNCE with sim(u, v) = max_g cos(u, rho(g) v) on the lifted features of two views of an e2_* backbone."""

    name: Literal["invariant_contrastive"] = "invariant_contrastive"
    temperature: float = Field(0.5, gt=0, description="InfoNCE temperature tau")
    similarity: Literal["max", "logsumexp", "plain"] = Field(
        "max", description="how the similarity reduces over g; plain: cos of the flattened lifted features, i.e. "
        "ordinary InfoNCE on them (the baseline the invariant similarity improves on)")
    soft_temperature: float = Field(0.1, gt=0, description="similarity logsumexp: its temperature")
    transform_views: bool = Field(
        True, description="apply a random group element to each view, which the invariant similarity absorbs"
    )

    def check(self, recipe: Recipe) -> None:
        require_equivariant_backbone(recipe)
