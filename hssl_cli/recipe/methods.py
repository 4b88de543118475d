"""Method configs (`method:`), one per method, each with its own cross-field checks against the rest of
the recipe (`check`). Adding a method adds a config here and its name to `MethodConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

from pydantic import Field, model_validator

from hssl_cli.recipe.sections import Section, Width

if TYPE_CHECKING:
    from hssl_cli.recipe.schema import Recipe


class Consumes(NamedTuple):
    """What a method reads each step: how many global views, whether it takes local (multi-crop) views,
    whether it also reads the un-augmented batch x0. The engine draws exactly these."""

    global_views: int = 2
    local_views: bool = False
    original: bool = False


class MethodSection(Section):
    """The base of every method config: what the method consumes and its cross-field checks."""

    @property
    def consumes(self) -> Consumes:
        return Consumes()

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError (naming the keys) when this method cannot run with the rest of `recipe`."""


def _check_predictor_width(predictor: list[int], recipe: Recipe) -> None:
    if predictor[-1] != recipe.model.projector[-1]:
        raise ValueError(f"method.predictor must end in the projector's width {recipe.model.projector[-1]}, "
                         f"got {predictor[-1]}")


def _require_equivariant_backbone(recipe: Recipe) -> None:
    if not recipe.model.backbone.startswith("e2_"):
        raise ValueError(f"method.name={recipe.method.name} needs an equivariant backbone: set model.backbone to "
                         "e2_convnet or e2_resnet18 and model.group")


class EquiModConfig(Section):
    """EquiMod (Devillers & Lefort 2023): predict how the embedding moves under known augmentation parameters."""

    weight: float = Field(1.0, ge=0, description="lambda in L = L_inv + lambda L_equi")
    temperature: float = Field(0.2, gt=0, description="tau_y of the equivariance NT-Xent")
    projector: list[Width] = Field(
        [2048, 2048, 128], min_length=1, description="widths of g_eq; its last layer ends in a BN without affine"
    )
    param_embedding: int = Field(128, ge=1, le=65_536,
        description="width of the parameter encoder enc(a_t) (Linear+BN)")
    params: Literal["matched", "permuted"] = Field(
        "matched", description="matched: each view's own parameters a_t (EquiMod); permuted: each view's parameter "
        "vectors permuted across the batch by a permutation drawn every step, so the predictor reads another "
        "image's a_t: the ablation that removes only the equivariance (same passes, heads, loss and negatives)")


class SimCLRConfig(MethodSection):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature tau")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")

    @property
    def consumes(self) -> Consumes:
        # multi-crop: NT-Xent on every (global, other view) pair; EquiMod also reads x0
        return Consumes(local_views=self.equimod is None, original=self.equimod is not None)


class BYOLConfig(MethodSection):
    name: Literal["byol"] = "byol"
    predictor: list[Width] = Field(
        [4096, 256], min_length=1, description="widths of the predictor q's layers; the last equals z's size"
    )
    ema: bool = Field(True, description="EMA target network; false: the target is the online embedding of the other "
                      "view under stop-gradient, i.e. SimSiam (Chen & He 2021) with BYOL's loss 2 - 2 cos per "
                      "direction: summed over both, 4 + 4 L with SimSiam's L = -(cos_1 + cos_2) / 2 "
                      "(recipes/simsiam_cifar10.yaml scales lr and weight decay)")
    ema_start: float = Field(0.99, ge=0, lt=1, description="tau_0 of the target EMA, raised to 1 by a cosine")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")

    @property
    def consumes(self) -> Consumes:
        return Consumes(original=self.equimod is not None)

    def check(self, recipe: Recipe) -> None:
        _check_predictor_width(self.predictor, recipe)


class VICRegConfig(MethodSection):
    name: Literal["vicreg"] = "vicreg"
    invariance_weight: float = Field(25.0, ge=0, description="lambda: weight of the invariance (MSE) term")
    variance_weight: float = Field(25.0, ge=0, description="mu: weight of the variance hinge")
    covariance_weight: float = Field(1.0, ge=0, description="nu: weight of the covariance term")
    variance_target: float = Field(1.0, gt=0, description="gamma: target standard deviation")
    eps: float = Field(1e-4, gt=0, description="epsilon inside the variance's square root")

    @property
    def consumes(self) -> Consumes:
        return Consumes(local_views=True)  # multi-crop: the loss on every (global, other view) pair


class DirectPredConfig(MethodSection):
    """DirectPred (Tian et al. 2021): the predictor W_P = U diag(s^alpha) U^T is set from the EMA
    correlation of the online embeddings, not learned."""

    name: Literal["directpred"] = "directpred"
    alpha: float = Field(0.5, ge=0, description="exponent on the normalised eigenvalues; 0 gives W_P = I "
                         "(no predictor: the collapsing ablation)")
    eps: float = Field(0.1, ge=0, description="added to the eigenvalues after dividing by the largest")
    rho: float = Field(0.998, ge=0, lt=1, description="EMA rate of the correlation C <- rho C + (1-rho) z^T z / B")
    ema: bool = Field(True, description="EMA target network (BYOL); false: the target is the online "
                      "embedding under stop-gradient (SimSiam)")
    ema_start: float = Field(0.99, ge=0, lt=1, description="tau_0 of the target EMA, raised to 1 by a cosine")
    loss: Literal["byol", "iso"] = Field("byol", description="byol: 2 - 2 cos(W_P z, z'); iso: IsoLoss "
                                         "(Halvagal et al. 2023), the same gradient applied to z directly")
    predictor_every: int = Field(1, ge=1, le=100_000, description="recompute W_P (an eigendecomposition, a host "
                                 "sync on a GPU) every this many training steps, reusing it in between; C is still "
                                 "updated every step. 1: the authors' code; 10 cost no accuracy at rho 0.998 "
                                 "(suites/directpred_predictor_every.yaml) and is what the GPU recipes use")
    eps_convention: Literal["inside", "outside"] = Field(
        "inside", description="inside: W_P = U diag((s/max + eps)^alpha) U^T (the paper's equation, the default); "
        "outside: U diag((s/max)^alpha + eps) U^T (the authors' released code)")


class DirectCopyConfig(DirectPredConfig):
    """DirectCopy (Wang et al. 2021): DirectPred with alpha = 1 (W_P is the normalised correlation plus eps I)."""

    name: Literal["directcopy"] = "directcopy"
    alpha: float = Field(1.0, ge=0, description="exponent on the normalised eigenvalues (1: W_P copies C)")
    eps: float = Field(0.25, ge=0, description="added to the eigenvalues after dividing by the largest")


class KernelConfig(MethodSection):
    """Kernel-regime SSL (Kiani et al. 2022): a closed-form solve on num_samples originals x their views,
    no SGD (optim and train.epochs/batch_size are not used). model.backbone is the network of the ntk and
    random_features kernels and is unused otherwise."""

    name: Literal["kernel"] = "kernel"
    kernel: Literal["rbf", "linear", "random_features", "ntk"] = Field(
        "rbf", description="k on normalised pixels: rbf, linear, random_features (features of the randomly "
        "initialised model.backbone) or ntk (its empirical neural tangent kernel, torch.func)")
    objective: Literal["contrastive", "non_contrastive", "kernel_pca", "none"] = Field(
        "contrastive", description="contrastive: |F^T F - A|^2; non_contrastive: tr(F L F^T) with F F^T/N = I; "
        "kernel_pca: no augmentation graph, the base kernel's own top-d features (a baseline); none: the base "
        "kernel's feature map itself, unreduced (approximation: random_features: the rank features phi(x), "
        "embedding_dim unused): the full base kernel")
    embedding_dim: int = Field(64, ge=1, le=65_536, description="d: size of the representation F(x)")
    num_samples: int = Field(1000, ge=2, le=1_000_000,
        description="originals drawn from the train split; the points are "
                    "num_samples x views, which sets the solve's size")
    augmentations_per_sample: int = Field(2, ge=1, le=64, description="augmented views of each original")
    include_original: bool = Field(True, description="also put the un-augmented image in each original's group")
    ridge: float = Field(1e-2, gt=0, description="lambda relative to mean(diag K): M = F (K + lambda I)^-1")
    bandwidth: float | None = Field(None, gt=0, description="rbf sigma in exp(-|x-y|^2 / 2 sigma^2) on normalised "
                                    "pixels; null: the median pairwise distance of the points")
    approximation: Literal["exact", "nystrom", "random_features"] = Field(
        "exact", description="exact: the N x N kernel matrix; nystrom: rank landmarks; random_features: rank "
        "random Fourier features (rbf only)")
    rank: int = Field(1024, ge=1, le=1_000_000, description="landmarks (nystrom) or random Fourier features")
    block_size: int = Field(512, ge=1, le=1_000_000,
        description="points per block of kernel evaluation (bounds the memory of "
                    "pixels/Jacobians held at once)")

    @property
    def views(self) -> int:
        return self.augmentations_per_sample + int(self.include_original)

    @property
    def representation_dim(self) -> int:
        """The size of F(x): embedding_dim, or the rank random features for objective none."""
        return self.rank if self.objective == "none" else self.embedding_dim

    @property
    def consumes(self) -> Consumes:
        return Consumes(global_views=0)  # a closed-form fit: it draws its own augmentations_per_sample views

    def check(self, recipe: Recipe) -> None:
        if recipe.views is not None:
            raise ValueError("views: method kernel draws its own views (method.augmentations_per_sample from "
                             "augment:); remove views:")

    @model_validator(mode="after")
    def _sizes_fit(self) -> KernelConfig:
        if self.approximation == "random_features" and self.kernel != "rbf":
            raise ValueError(f"method.approximation=random_features approximates the rbf kernel, not "
                             f"'{self.kernel}'; use approximation: nystrom")
        if self.objective == "none":
            if self.approximation != "random_features":
                raise ValueError("method.objective=none keeps the base kernel's feature map unreduced, which only "
                                 "approximation: random_features has in finite form; set it (and rank)")
            return self
        if self.objective == "kernel_pca" and self.embedding_dim > self.num_samples * self.views:
            raise ValueError(f"method.embedding_dim={self.embedding_dim} exceeds the {self.num_samples * self.views} "
                             "points (num_samples x views) that kernel_pca has directions for; lower it")
        if self.objective != "kernel_pca" and self.embedding_dim > self.num_samples:
            raise ValueError(f"method.embedding_dim={self.embedding_dim} exceeds method.num_samples="
                             f"{self.num_samples}: the augmentation graph has one component per original, so at "
                             "most num_samples directions are invariant; lower embedding_dim")
        if self.approximation != "exact" and self.rank < self.embedding_dim:
            raise ValueError(f"method.rank={self.rank} is below method.embedding_dim={self.embedding_dim}; "
                             "a rank-r kernel gives at most r directions")
        if self.approximation == "nystrom" and self.rank > self.num_samples * self.views:
            raise ValueError(f"method.rank={self.rank} landmarks exceed the {self.num_samples * self.views} "
                             "points (num_samples x views); lower rank or use approximation: exact")
        return self


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
    fibres_from: Literal["last", "layer3", "layer4"] = Field(
        "last", description="position fibres: the map they are read from; last: the last map before pooling "
        "(resnet18_cifar: layer4); layer3: ResNet's third stage (twice the grid)")
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
            _check_predictor_width(self.predictor, recipe)

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
            _check_predictor_width(self.predictor, recipe)

    def _check_positions(self, recipe: Recipe) -> None:
        if self.pairing == "inputs":
            raise ValueError(f"method.pairing: inputs with fibres: {self.fibres}; the augmentation twin of position "
                             "fibres is random crops: method simclr with augment.crop_scale")
        if self.pairs.distribution == "subset":
            raise ValueError("method.pairs.distribution: subset names group elements; position pairs are uniform "
                             "or neighbourhood")
        if self.fibres_from != "last" and not recipe.model.backbone.startswith(("resnet", "torchvision:resnet")):
            raise ValueError(f"method.fibres_from: {self.fibres_from} is a ResNet stage; {recipe.model.backbone} has "
                             "only its last map (fibres_from: last)")
        if self.loss == "byol":
            _check_predictor_width(self.predictor, recipe)


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
        _require_equivariant_backbone(recipe)


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
        _require_equivariant_backbone(recipe)


class BarlowTwinsConfig(MethodSection):
    """Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' standardised embeddings
    is pushed to the identity."""

    name: Literal["barlow_twins"] = "barlow_twins"
    redundancy_weight: float = Field(5e-3, ge=0, description="lambda: weight of the off-diagonal (redundancy) "
                                     "terms; the paper's 5e-3 is for an 8192-wide projector")

    @property
    def consumes(self) -> Consumes:
        return Consumes(local_views=True)  # multi-crop: the loss on every (global, other view) pair


class MoCoV3Config(MethodSection):
    """MoCo v3 (Chen, Xie & He 2021): a momentum encoder (EMA of f and g) gives the keys, the online
    f, g, q the queries; symmetrised InfoNCE with the other images' keys (of every rank) as negatives."""

    name: Literal["mocov3"] = "mocov3"
    temperature: float = Field(1.0, gt=0, description="tau of the InfoNCE (the paper: 1.0 for ResNets, "
                               "0.2 for ViTs); the loss is scaled by 2 tau as in the paper's code")
    predictor: list[Width] = Field(
        [4096, 256], min_length=1, description="widths of the predictor q's layers; the last equals z's size")
    ema_start: float = Field(0.99, ge=0, lt=1, description="m_0 of the momentum encoder, raised to 1 by a cosine")

    def check(self, recipe: Recipe) -> None:
        _check_predictor_width(self.predictor, recipe)


MethodConfig = Annotated[SimCLRConfig | BYOLConfig | VICRegConfig | DirectPredConfig | DirectCopyConfig | KernelConfig
                         | HSSLConfig | EquivariantPretextConfig | InvariantContrastiveConfig | BarlowTwinsConfig
                         | MoCoV3Config,
                         Field(discriminator="name")]


