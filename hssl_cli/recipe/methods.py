"""Method configs (`method:`), one per method, each with its own cross-field checks against the rest of
the recipe (`check`), and `MethodConfig`, the union `method:` is parsed as. The equivariant-network methods are
in `equivariant_methods`, their shared base in `method_base`. Adding a method adds a config and its name to
`MethodConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from hssl_cli.recipe.equivariant_methods import (
    EquivariantPretextConfig,
    HSSLConfig,
    InvariantContrastiveConfig,
)
from hssl_cli.recipe.essl import EsslConfig, essl_heads, essl_reads
from hssl_cli.recipe.method_base import Consumes, MethodSection, check_predictor_width
from hssl_cli.recipe.sections import Section, Width

if TYPE_CHECKING:
    from hssl_cli.recipe.schema import Recipe


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


def check_equimod_views(equimod: EquiModConfig | None, essl: EsslConfig | None, recipe: Recipe) -> None:
    """EquiMod pairs x0 with the global views; a local view would join the invariance term only, a mix neither
    paper defines: refused, unless the local views are E-SSL's own (method.essl.views: local)."""
    if equimod is None or essl_reads(essl, "local"):
        return
    local_count = sum(view.count for view in recipe.resolved_views() if view.role == "local")
    if local_count:
        raise ValueError(f"method.equimod takes no local (multi-crop) views, the views list has {local_count}; "
                         "remove them from views: or set method.equimod: null")


class SimCLRConfig(MethodSection):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature tau")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")
    essl: EsslConfig | None = Field(None, description="add E-SSL's rotation prediction (null: off); it composes "
                                    "with equimod: both terms are added to the loss")

    @property
    def consumes(self) -> Consumes:
        # multi-crop: NT-Xent on every (global, other view) pair; EquiMod also reads x0; E-SSL reads its views
        return Consumes(local_views=self.equimod is None or essl_reads(self.essl, "local"),
                        original=self.equimod is not None or essl_reads(self.essl, "original"))

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        heads = essl_heads(self.essl, feature_width)
        if self.equimod is not None:
            heads["method.equimod.projector"] = [feature_width, *self.equimod.projector]
        return heads

    def check(self, recipe: Recipe) -> None:
        check_equimod_views(self.equimod, self.essl, recipe)
        if self.essl is not None:
            self.essl.check(recipe)


class BYOLConfig(MethodSection):
    name: Literal["byol"] = "byol"
    predictor: list[Width] = Field(
        [4096, 256], min_length=1, description="widths of the predictor q's layers; the last equals z's size"
    )
    ema: bool = Field(True, description="EMA target network; false: the target is the online embedding of the other "
                      "global view under stop-gradient, i.e. SimSiam (Chen & He 2021) with BYOL's loss 2 - 2 cos per "
                      "direction: summed over both, 4 + 4 L with SimSiam's L = -(cos_1 + cos_2) / 2 "
                      "(recipes/simsiam_cifar10.yaml scales lr and weight decay)")
    ema_start: float = Field(0.99, ge=0, lt=1, description="tau_0 of the target EMA, raised to 1 by a cosine")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")
    essl: EsslConfig | None = Field(None, description="add E-SSL's rotation prediction (null: off); it composes "
                                    "with equimod: both terms are added to the loss")

    @property
    def consumes(self) -> Consumes:
        # multi-crop: the target reads the global views, the online networks every view; EquiMod reads x0 (and no
        # local views); E-SSL reads its views
        return Consumes(local_views=self.equimod is None or essl_reads(self.essl, "local"),
                        original=self.equimod is not None or essl_reads(self.essl, "original"))

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        heads = {"method.predictor": [projector_width, *self.predictor], **essl_heads(self.essl, feature_width)}
        if self.equimod is not None:
            heads["method.equimod.projector"] = [feature_width, *self.equimod.projector]
        return heads

    def check(self, recipe: Recipe) -> None:
        check_predictor_width(self.predictor, recipe)
        check_equimod_views(self.equimod, self.essl, recipe)
        if self.essl is not None:
            self.essl.check(recipe)


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
                      "embedding of the other global view under stop-gradient (SimSiam)")
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

    @property
    def consumes(self) -> Consumes:
        return Consumes(local_views=True)  # multi-crop: the target reads the global views, W_P z every view

    @property
    def loss_variant(self) -> str | None:
        return self.loss


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
    f, g, q the queries; symmetrised InfoNCE with the other images' keys (of every rank) as negatives. With
    local views (multi-crop) the keys come from the global views only, the queries from every view."""

    name: Literal["mocov3"] = "mocov3"
    temperature: float = Field(1.0, gt=0, description="tau of the InfoNCE (the paper: 1.0 for ResNets, "
                               "0.2 for ViTs); the loss is scaled by 2 tau as in the paper's code")
    predictor: list[Width] = Field(
        [4096, 256], min_length=1, description="widths of the predictor q's layers; the last equals z's size")
    ema_start: float = Field(0.99, ge=0, lt=1, description="m_0 of the momentum encoder, raised to 1 by a cosine")

    @property
    def consumes(self) -> Consumes:
        return Consumes(local_views=True)  # multi-crop: keys from the global views, queries from every view

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        return {"method.predictor": [projector_width, *self.predictor]}

    def check(self, recipe: Recipe) -> None:
        check_predictor_width(self.predictor, recipe)


class DINOConfig(MethodSection):
    """DINO (Caron et al. 2021): a student f, head and a teacher (their EMA); the teacher's output over the
    global views, centred and sharpened, is the target of the student's on every other view (multi-crop).
    model.projector is the head's MLP (the paper: [2048, 2048, 256]), followed by the K prototypes."""

    name: Literal["dino"] = "dino"
    prototypes: Width = Field(65_536, description="K: output width of the head's weight-normalised last layer")
    student_temperature: float = Field(0.1, gt=0, description="tau_s of the student's softmax")
    teacher_temperature: float = Field(0.04, gt=0, description="tau_t of the teacher's softmax after the warm-up "
                                       "(the paper: 0.04 to 0.07)")
    warmup_teacher_temperature: float = Field(0.04, gt=0, description="tau_t at epoch 0, raised linearly to "
                                              "teacher_temperature")
    warmup_teacher_temperature_epochs: float = Field(30.0, ge=0, le=100_000, description="epochs of the linear "
                                                     "tau_t warm-up (per step, fractional epochs), then constant")
    centre_momentum: float = Field(0.9, ge=0, lt=1, description="m in c <- m c + (1 - m) mean of the teacher's "
                                   "outputs over the global batch")
    ema_start: float = Field(0.996, ge=0, lt=1, description="tau_0 of the teacher EMA, raised to 1 by a cosine")
    norm_last_layer: bool = Field(True, description="the last layer's weight-norm g fixed to 1 (the paper's "
                                  "default, which stabilises training); false: g learned")
    freeze_last_layer: float = Field(1.0, ge=0, le=100_000, description="epochs during which the last layer "
                                     "(the prototypes) receives no gradient")
    head_batchnorm: bool = Field(False, description="BatchNorm in the head's hidden layers (the authors' choice "
                                 "for ResNet-50; ViTs: none)")

    @property
    def consumes(self) -> Consumes:
        return Consumes(local_views=True)  # the teacher reads the 2 global views, the student every view

    def extra_heads(self, projector_width: int, feature_width: int) -> dict[str, list[int]]:
        return {"method.prototypes": [projector_width, self.prototypes]}


MethodConfig = Annotated[SimCLRConfig | BYOLConfig | VICRegConfig | DirectPredConfig | DirectCopyConfig | KernelConfig
                         | HSSLConfig | EquivariantPretextConfig | InvariantContrastiveConfig | BarlowTwinsConfig
                         | MoCoV3Config | DINOConfig,
                         Field(discriminator="name")]

# the methods that take local views (with their default keys), named where a recipe gives local views to another
MULTI_CROP_METHODS = ("simclr", "vicreg", "barlow_twins", "byol", "directpred", "directcopy", "mocov3", "dino")
