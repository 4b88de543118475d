"""The recipe: one typed schema for every experiment, loaded from YAML, overridable with `--set`.

The schema below is the truth (DESIGN.md shows an illustrative recipe). Every key has a default and
a description. Errors name the file, the line, the dotted key and a fix. This module imports no
torch, so `hssl pretrain bad.yaml` fails in a fraction of a second.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hssl_cli.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ordered_pair(pair: tuple[float, float], low: float, high: float, what: str) -> tuple[float, float]:
    if not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{what} must satisfy {low} <= first <= second <= {high}, got {list(pair)}")
    return pair


class DataConfig(Section):
    dataset: Literal["digits", "mnist", "cifar10", "stl10", "imagefolder"] = Field(
        "digits", description="dataset source; digits is built in (scikit-learn), the others read data.root"
    )
    root: str | None = Field(None, description="folder with the dataset files (not needed for digits)")
    image_size: int = Field(32, ge=8, le=512, description="side of the square images fed to the model")
    train_split: str = Field("train", description="split used for pretraining and for fitting probes")
    test_split: str = Field("test", description="split used to report probe accuracy")
    subset: int | None = Field(
        None, ge=1, description="pretrain on this many train images (a seeded random subset; probes use all)"
    )
    random_rotation: bool = Field(
        False, description="rotate each image by its own fixed random angle (rotated-MNIST protocol; the same "
        "angles in pretrain, probe and checks)"
    )


class ColorJitterConfig(Section):
    p: float = Field(0.8, ge=0, le=1, description="probability of applying colour jitter to a view")
    brightness: float = Field(0.4, ge=0, description="brightness factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.4, ge=0, description="contrast factor drawn from [1-c, 1+c]")
    saturation: float = Field(0.4, ge=0, description="saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(0.1, ge=0, le=0.5, description="hue shift drawn from [-h, h] (fraction of a turn)")


class BlurConfig(Section):
    p: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur")
    sigma: tuple[float, float] = Field((0.1, 2.0), description="blur sigma range in pixels")
    kernel_size: int | None = Field(None, ge=3, description="odd kernel side; default about 10% of the image")

    @field_validator("sigma")
    @classmethod
    def _sigma_range(cls, sigma: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(sigma, 1e-3, 100.0, "sigma")

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, size: int | None) -> int | None:
        if size is not None and size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {size}")
        return size


class AugmentConfig(Section):
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="area fraction range of the random crop")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range of the crop")
    flip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    color_jitter: ColorJitterConfig = Field(default_factory=ColorJitterConfig)
    grayscale: float = Field(0.2, ge=0, le=1, description="probability of converting a view to grayscale")
    blur: BlurConfig = Field(default_factory=BlurConfig)
    solarize: float = Field(0.0, ge=0, le=1, description="probability of solarizing (threshold 0.5)")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(scale, 1e-3, 1.0, "crop_scale")

    @field_validator("crop_ratio")
    @classmethod
    def _ratio_range(cls, ratio: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(ratio, 1e-2, 100.0, "crop_ratio")


class GroupConfig(Section):
    name: Literal["C", "D"] = Field("C", description="C: rotations by multiples of 360/N; D: those and reflections")
    order: int = Field(8, ge=1, le=64, description="N; the group has N (C) or 2N (D) elements")


class ModelConfig(Section):
    backbone: Literal["resnet18_cifar", "small_convnet", "e2_convnet", "e2_resnet18"] = Field(
        "resnet18_cifar", description="feature extractor f; small_convnet is for quick CPU runs; e2_*: "
        "equivariant to model.group (escnn)"
    )
    projector: list[Annotated[int, Field(ge=1)]] = Field(
        [2048, 2048, 128], min_length=1, description="widths of the projector g's layers; the last is z's size"
    )
    group: GroupConfig | None = Field(None, description="symmetry group of e2_* backbones and of H-SSL's fibres")
    widths: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="e2_* backbones: regular fields per stage (|G| channels each); default "
        "e2_convnet [16, 32, 64], e2_resnet18 [16, 32, 64, 128]"
    )


class EquiModConfig(Section):
    """EquiMod (Devillers & Lefort 2023): predict how the embedding moves under known augmentation parameters."""

    weight: float = Field(1.0, ge=0, description="lambda in L = L_inv + lambda L_equi")
    temperature: float = Field(0.2, gt=0, description="tau_y of the equivariance NT-Xent")
    projector: list[Annotated[int, Field(ge=1)]] = Field(
        [2048, 2048, 128], min_length=1, description="widths of g_eq; its last layer ends in a BN without affine"
    )
    param_embedding: int = Field(128, ge=1, description="width of the parameter encoder enc(a_t) (Linear+BN)")


class SimCLRConfig(Section):
    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature tau")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")


class BYOLConfig(Section):
    name: Literal["byol"] = "byol"
    predictor: list[Annotated[int, Field(ge=1)]] = Field(
        [4096, 256], min_length=1, description="widths of the predictor q's layers; the last equals z's size"
    )
    ema_start: float = Field(0.99, ge=0, lt=1, description="tau_0 of the target EMA, raised to 1 by a cosine")
    equimod: EquiModConfig | None = Field(None, description="add EquiMod's equivariance branch (null: off)")


class VICRegConfig(Section):
    name: Literal["vicreg"] = "vicreg"
    invariance_weight: float = Field(25.0, ge=0, description="lambda: weight of the invariance (MSE) term")
    variance_weight: float = Field(25.0, ge=0, description="mu: weight of the variance hinge")
    covariance_weight: float = Field(1.0, ge=0, description="nu: weight of the covariance term")
    variance_target: float = Field(1.0, gt=0, description="gamma: target standard deviation")
    eps: float = Field(1e-4, gt=0, description="epsilon inside the variance's square root")


class DirectPredConfig(Section):
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


class DirectCopyConfig(DirectPredConfig):
    """DirectCopy (Wang et al. 2021): DirectPred with alpha = 1 (W_P is the normalised correlation plus eps I)."""

    name: Literal["directcopy"] = "directcopy"
    alpha: float = Field(1.0, ge=0, description="exponent on the normalised eigenvalues (1: W_P copies C)")
    eps: float = Field(0.25, ge=0, description="added to the eigenvalues after dividing by the largest")


class KernelConfig(Section):
    """Kernel-regime SSL (Kiani et al. 2022): a closed-form solve on num_samples originals x their views,
    no SGD (optim and train.epochs/batch_size are not used). model.backbone is the network of the ntk and
    random_features kernels and is unused otherwise."""

    name: Literal["kernel"] = "kernel"
    kernel: Literal["rbf", "linear", "random_features", "ntk"] = Field(
        "rbf", description="k on normalised pixels: rbf, linear, random_features (features of the randomly "
        "initialised model.backbone) or ntk (its empirical neural tangent kernel, torch.func)")
    objective: Literal["contrastive", "non_contrastive", "kernel_pca"] = Field(
        "contrastive", description="contrastive: |F^T F - A|^2; non_contrastive: tr(F L F^T) with F F^T/N = I; "
        "kernel_pca: no augmentation graph, the base kernel's own top-d features (a baseline)")
    embedding_dim: int = Field(64, ge=1, description="d: size of the representation F(x)")
    num_samples: int = Field(1000, ge=2, description="originals drawn from the train split; the points are "
                             "num_samples x views, which sets the solve's size")
    augmentations_per_sample: int = Field(2, ge=1, description="augmented views of each original")
    include_original: bool = Field(True, description="also put the un-augmented image in each original's group")
    ridge: float = Field(1e-2, gt=0, description="lambda relative to mean(diag K): M = F (K + lambda I)^-1")
    bandwidth: float | None = Field(None, gt=0, description="rbf sigma in exp(-|x-y|^2 / 2 sigma^2) on normalised "
                                    "pixels; null: the median pairwise distance of the points")
    approximation: Literal["exact", "nystrom", "random_features"] = Field(
        "exact", description="exact: the N x N kernel matrix; nystrom: rank landmarks; random_features: rank "
        "random Fourier features (rbf only)")
    rank: int = Field(1024, ge=1, description="landmarks (nystrom) or random Fourier features")
    block_size: int = Field(512, ge=1, description="points per block of kernel evaluation (bounds the memory of "
                            "pixels/Jacobians held at once)")

    @property
    def views(self) -> int:
        return self.augmentations_per_sample + int(self.include_original)

    @model_validator(mode="after")
    def _sizes_fit(self) -> KernelConfig:
        if self.objective == "kernel_pca" and self.embedding_dim > self.num_samples * self.views:
            raise ValueError(f"method.embedding_dim={self.embedding_dim} exceeds the {self.num_samples * self.views} "
                             "points (num_samples x views) that kernel_pca has directions for; lower it")
        if self.objective != "kernel_pca" and self.embedding_dim > self.num_samples:
            raise ValueError(f"method.embedding_dim={self.embedding_dim} exceeds method.num_samples="
                             f"{self.num_samples}: the augmentation graph has one component per original, so at "
                             "most num_samples directions are invariant; lower embedding_dim")
        if self.approximation == "random_features" and self.kernel != "rbf":
            raise ValueError(f"method.approximation=random_features approximates the rbf kernel, not "
                             f"'{self.kernel}'; use approximation: nystrom")
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
        "either way (a weaker augmentation); subset: g1 != g2 both from elements")
    max_steps: int = Field(1, ge=1, description="neighbourhood: largest relative rotation, in steps of 360/N")
    elements: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="subset: element indices, k = rotation by k*360/N, N+k = horizontal flip then it")


class HSSLConfig(Section):
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
        "fibres of T_g1 t1 x and T_g2 t2 x")
    structure: Literal["kept", "removed"] = Field(
        "kept", description="removed: the ablation; the backbone's layout without equivariance, its channels "
        "split into |G| pseudo-fibres")
    predictor: list[Annotated[int, Field(ge=1)]] = Field(
        [512, 128], min_length=1, description="loss byol: widths of the predictor q; the last equals the projector's")
    ema_start: float = Field(0.99, ge=0, lt=1, description="loss byol: tau_0 of the target EMA, raised to 1")
    invariance_weight: float = Field(25.0, ge=0, description="loss vicreg: lambda (invariance)")
    variance_weight: float = Field(25.0, ge=0, description="loss vicreg: mu (variance hinge)")
    covariance_weight: float = Field(1.0, ge=0, description="loss vicreg: nu (covariance)")


class EquivariantPretextConfig(Section):
    """Rotation (and, for D_N, flip) prediction with an equivariant head on an e2_* backbone: the logit of
    element h reads fibre h, so logits(T_g x) = P_g logits(x); the target of T_g x is g (= g . e)."""

    name: Literal["equivariant_pretext"] = "equivariant_pretext"
    head: Literal["equivariant", "invariant"] = Field(
        "equivariant", description="equivariant: logit h reads fibre h; invariant: plain rotation prediction, a "
        "linear classifier on the group-pooled features, which an invariant backbone cannot solve (a baseline)")
    contrastive_weight: float = Field(0.0, ge=0, description="weight of an added NT-Xent on two augmented views")
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature of the contrastive term")


class InvariantContrastiveConfig(Section):
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


MethodConfig = Annotated[SimCLRConfig | BYOLConfig | VICRegConfig | DirectPredConfig | DirectCopyConfig | KernelConfig
                         | HSSLConfig | EquivariantPretextConfig | InvariantContrastiveConfig,
                         Field(discriminator="name")]


class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw"] = Field("lars", description="optimiser")
    lr: float = Field(0.3, gt=0, description="peak learning rate, reached after the warm-up")
    weight_decay: float = Field(1e-6, ge=0, description="weight decay (L2 for sgd/lars, decoupled for adamw)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum (sgd, lars)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (adamw)")
    warmup_epochs: float = Field(10.0, ge=0, description="linear warm-up length, then a cosine decay")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="lr at the end, as a fraction of optim.lr")
    lars_trust: float = Field(1e-3, gt=0, description="LARS trust coefficient eta")
    exclude_bias_and_norm: bool = Field(
        True, description="no weight decay and no LARS scaling for biases and normalisation weights"
    )


class TrainConfig(Section):
    epochs: int = Field(100, ge=0, description="passes over the training split; 0 writes the initialised model "
                        "(the untrained baseline a comparison needs)")
    batch_size: int = Field(256, ge=2, description="images per step (each gives two views)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast and channels_last on CUDA, fp32 on the CPU"
    )
    compile: bool = Field(False, description="torch.compile the model and the augmentation "
                          "(pays off on long GPU runs)")
    checkpoint_every: int = Field(10, ge=1, description="write epoch-NNNN.safetensors every this many epochs")
    log_every: int = Field(10, ge=1, description="steps between rows of the JSONL metrics log")
    diagnostics_every: int = Field(
        5, ge=0, description="epochs between collapse diagnostics on a held batch, logged to metrics.jsonl; 0: off"
    )


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name; the output folder")
    seed: int = Field(0, ge=0, description="seed of the data order, the augmentations and the initial weights")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=SimCLRConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _heads_fit(self) -> Recipe:
        if isinstance(self.method, BYOLConfig) and self.method.predictor[-1] != self.model.projector[-1]:
            raise ValueError(
                f"method.predictor must end in the projector's width {self.model.projector[-1]}, "
                f"got {self.method.predictor[-1]}"
            )
        if self.data.dataset != "digits" and self.data.root is None:
            raise ValueError(f"data.root is required for dataset '{self.data.dataset}'")
        return self

    @model_validator(mode="after")
    def _group_fits(self) -> Recipe:
        model, method, hssl = self.model, self.method, isinstance(self.method, HSSLConfig)
        equivariant = model.backbone.startswith("e2_")
        if (equivariant or hssl) and model.group is None:
            needs = f"model.backbone '{model.backbone}'" if equivariant else "method hssl (it pairs the group's fibres)"
            raise ValueError(f"model.group is required for {needs}; e.g. group: {{name: C, order: 8}}")
        if model.widths is not None and not equivariant:
            raise ValueError(f"model.widths: only e2_* backbones take widths, not '{model.backbone}'; remove it")
        if model.backbone == "e2_resnet18" and model.widths is not None and len(model.widths) != 4:
            raise ValueError(f"model.widths: e2_resnet18 has 4 stages, got {len(model.widths)} widths")
        if not hssl:
            return self
        if method.structure == "kept" and not equivariant:
            raise ValueError(f"method.structure 'kept' needs an equivariant model.backbone (e2_convnet, e2_resnet18), "
                             f"got '{model.backbone}'; for the ablation set method.structure: removed")
        size = model.group.order * (2 if model.group.name == "D" else 1)
        pairs = method.pairs
        if pairs.distribution == "subset" and (pairs.elements is None or len(set(pairs.elements)) < 2
                                               or max(pairs.elements) >= size):
            raise ValueError(f"method.pairs.elements: subset needs at least two distinct indices below |G| = {size}, "
                             f"got {pairs.elements}")
        if pairs.distribution == "neighbourhood" and 2 * pairs.max_steps > model.group.order:
            raise ValueError(f"method.pairs.max_steps={pairs.max_steps} exceeds half of N={model.group.order}; "
                             "use distribution: uniform")
        if size < 2:
            raise ValueError("model.group: H-SSL needs at least two group elements to pair")
        if method.loss == "byol" and method.predictor[-1] != model.projector[-1]:
            raise ValueError(f"method.predictor must end in the projector's width {model.projector[-1]}, "
                             f"got {method.predictor[-1]}")
        return self


# Keys that may change between a run and its resumption without altering the result.
RESUME_SAFE_KEYS = frozenset(
    {"data.root", "train.checkpoint_every", "train.log_every", "train.compile", "train.diagnostics_every"}
)


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe file, apply `--set key.sub=value` overrides, validate against the schema."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file (see the recipes/ folder for examples)")
    return parse_recipe(read_text_file(path, "recipe"), source=str(path), overrides=overrides)


MAX_TEXT_FILE_BYTES = 1_000_000  # recipes and suites are a few kB; a bigger file is not one


def read_text_file(path: Path, what: str) -> str:
    """A recipe or suite file's text; unreadable, oversized or non-UTF-8 files are one-line errors."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as error:
        raise RecipeError(f"{path}: cannot read this {what} file ({error.strerror})") from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_TEXT_FILE_BYTES:,} bytes; a {what} is a short YAML text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text (byte {error.start}); a {what} is a YAML text file") from None


def read_yaml_mapping(text: str, source: str, what: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML document that must be a mapping (an empty one is {}), and the line of every key path."""
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} on line {context_mark.line + 1})"
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {what}, not a list or value")
    return raw, lines


def parse_recipe(text: str, source: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    raw, lines = read_yaml_mapping(text, source, "a recipe is a YAML mapping of sections (data, augment, ...)")
    raw.setdefault("name", Path(source).stem)
    overridden = {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override)
        overridden[key] = override
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(describe_validation_error(error, source, lines, Recipe, overridden)) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key, defaults included; stored in each checkpoint."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def changed_keys(old: Recipe, new: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    old_flat, new_flat = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(key for key in old_flat.keys() | new_flat.keys() if old_flat.get(key) != new_flat.get(key))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, value = override.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise RecipeError(f"--set {override}: expected key.sub=value, e.g. --set optim.lr=0.2")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise RecipeError(f"--set {override}: the value is not valid YAML") from None


def _set_dotted(tree: dict[str, Any], key: str, value: Any, override: str) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for index, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parents[: index + 1])
            raise RecipeError(f"--set {override}: '{prefix}' is a value, not a section")
        node = child
    node[leaf] = value


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, str(index))
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def describe_validation_error(error: ValidationError, source: str, lines: dict, root: type[BaseModel],
                              overridden: dict[str, str] | None = None) -> str:
    """Turn pydantic's first error into one line naming file:line, the dotted key and the fix."""
    first = error.errors()[0]
    path, model = _schema_path(first["loc"], root)
    key = ".".join(path) or "(top level)"
    if first["type"] == "extra_forbidden":
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"did you mean '{'.'.join((*path[:-1], close[0]))}'?" if close else f"known keys: {', '.join(known)}"
        message = f"unknown key '{key}'; {hint}"
    elif first["type"] == "union_tag_invalid":
        message = f"{key}: {first['msg']}"
    elif first["type"] == "value_error" or not path:
        message = first["msg"].removeprefix("Value error, ")
        message = f"{key}: {message}" if path else message
    else:
        given = first.get("input")
        shown = "" if isinstance(given, dict) or first["type"] == "missing" else f" (got {given!r})"
        message = f"{key}: {first['msg']}{shown}"
    if error.error_count() > 1:
        message += f" (and {error.error_count() - 1} more problem(s))"
    for dotted, override in (overridden or {}).items():
        if path and (key == dotted or f"{key}.".startswith(f"{dotted}.") or dotted.startswith(f"{key}.")):
            return f"--set {override}: {message}"
    line = next((lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in lines), None)
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


def _schema_path(loc: tuple, root: type[BaseModel]) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """Drop the union tags pydantic puts in error locations; return the key path and the model
    that holds its last key (for "did you mean")."""
    model: type[BaseModel] | None = root
    owner = model
    path: list[str] = []
    parts = [str(part) for part in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        owner = model
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        if typing.get_origin(annotation) is list and parts and parts[0].isdigit():  # a list of sections
            path.append(parts.pop(0))
            annotation = typing.get_args(annotation)[0]
        members = _union_members(annotation) if field else []
        if len(members) > 1 and parts:
            tag = parts.pop(0)
            model = next((m for m in members if m.model_fields["name"].default == tag), None)
        else:
            model = members[0] if len(members) == 1 else None
    return tuple(path), owner


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = typing.get_args(annotation)
    else:
        candidates = (annotation,)
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
