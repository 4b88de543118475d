"""The recipe's sections other than the method: data, augmentation, per-view pipelines, model, optimiser,
training. Every key has a default and a description; pydantic only, no torch."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

MAX_WIDTH = 65_536  # widest layer a recipe may ask for; the heads' memory is bounded again in schema.py
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# A YAML list of two numbers (strict validation takes tuples only as tuples)
FloatPair = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]

AUGMENT_SECTIONS = ("color_jitter", "blur")  # the nested sections of augment:, which a view overrides key by key
DatasetName = Literal["digits", "mnist", "cifar10", "cifar100", "cifar100_coarse", "stl10", "imagefolder", "shards"]
BUILT_IN_BACKBONES = ("resnet18_cifar", "small_convnet", "vit", "e2_convnet", "e2_resnet18")


class Section(BaseModel):
    """Strict: unknown keys are refused, numbers are not strings or booleans (YAML 1.1's `true` is not 1),
    and no float is infinite or NaN."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _ordered_pair(pair: tuple[float, float], low: float, high: float, what: str) -> tuple[float, float]:
    if not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{what} must satisfy {low} <= first <= second <= {high}, got {list(pair)}")
    return pair


class DataConfig(Section):
    dataset: DatasetName = Field(
        "digits", description="dataset source; digits is built in (scikit-learn), the others read data.root "
        "(cifar100: its 100 classes, cifar100_coarse: the same images labelled by the 20 superclasses; "
        "shards: a folder written by hssl shards)"
    )
    root: str | None = Field(None, description="folder with the dataset files (not needed for digits)")
    image_size: int = Field(32, ge=8, le=512, description="side of the square images fed to the model")
    train_split: str = Field("train", description="split used for pretraining and for fitting probes")
    test_split: str = Field("test", description="split used to report probe accuracy")
    subset: int | None = Field(
        None, ge=1, le=1_000_000_000,
            description="pretrain on this many train images (a seeded random subset; probes use all)"
    )
    storage: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: the decoded training split held on the device; stream: kept encoded, read "
        "and decoded batch by batch by data.workers (image folders and shards); auto: memory when the decoded "
        "split takes at most 25% of the device's memory")
    workers: int = Field(2, ge=0, le=256, description="data.storage stream: DataLoader workers reading and "
                         "decoding ahead (0: in the training process)")
    on_corrupt: Literal["stop", "skip"] = Field(
        "stop", description="an image or shard that cannot be read: stop the run naming it, or skip it (a warning)")
    random_rotation: bool = Field(
        False, description="rotate each image by its own fixed random angle (rotated-MNIST protocol; the same "
        "angles in pretrain, probe and checks)"
    )


class ColorJitterConfig(Section):
    p: float = Field(0.8, ge=0, le=1, description="probability of applying colour jitter to a view")
    brightness: float = Field(0.4, ge=0, le=10, description="brightness factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.4, ge=0, le=10, description="contrast factor drawn from [1-c, 1+c]")
    saturation: float = Field(0.4, ge=0, le=10, description="saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(0.1, ge=0, le=0.5, description="hue shift drawn from [-h, h] (fraction of a turn)")


class BlurConfig(Section):
    p: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur")
    sigma: FloatPair = Field((0.1, 2.0), description="blur sigma range in pixels")
    kernel_size: int | None = Field(None, ge=3, le=255, description="odd kernel side; default about 10% of the image")

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
    crop_scale: FloatPair = Field((0.2, 1.0), description="area fraction range of the random crop")
    crop_ratio: FloatPair = Field((3 / 4, 4 / 3), description="aspect ratio range of the crop")
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


class ViewSpec(Section):
    """One group of views: `count` views of `size` pixels, drawn with augment: overridden by the keys given
    here (nested sections key by key, e.g. blur: {p: 1.0} keeps augment.blur.sigma)."""

    size: int | None = Field(None, ge=4, le=512, description="side of these views in pixels; default data.image_size")
    count: int = Field(1, ge=1, le=64, description="views this spec draws, in one batched call")
    role: Literal["global", "local"] | None = Field(
        None, description="global: the views every loss pairs; local: multi-crop views, each compared with every "
        "global view; default global at data.image_size, local when smaller")
    crop_scale: FloatPair | None = Field(None, description="overrides augment.crop_scale")
    crop_ratio: FloatPair | None = Field(None, description="overrides augment.crop_ratio")
    flip: float | None = Field(None, description="overrides augment.flip")
    color_jitter: dict[str, Any] | None = Field(None, description="overrides keys of augment.color_jitter")
    grayscale: float | None = Field(None, description="overrides augment.grayscale")
    blur: dict[str, Any] | None = Field(None, description="overrides keys of augment.blur")
    solarize: float | None = Field(None, description="overrides augment.solarize")

    def augment_config(self, base: AugmentConfig) -> AugmentConfig:
        """augment: with this view's overrides; ValueError naming the overridden key when the result is invalid."""
        merged = base.model_dump()
        # keys given as null override nothing (a stored recipe lists every key, most of them null)
        for key, value in self.model_dump(exclude_unset=True, exclude_none=True,
                                          exclude={"size", "count", "role"}).items():
            merged[key] = {**merged[key], **value} if key in AUGMENT_SECTIONS and value is not None else value
        try:
            return AugmentConfig.model_validate(merged)
        except ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{key}: {first['msg'].removeprefix('Value error, ')}") from None


class ResolvedView(BaseModel):
    """A view spec made concrete: its augmentation, size, count and role (what the engine draws)."""

    augment: AugmentConfig
    size: int
    count: int
    role: Literal["global", "local"]


class GroupConfig(Section):
    name: Literal["C", "D"] = Field("C", description="C: rotations by multiples of 360/N; D: those and reflections")
    order: int = Field(8, ge=1, le=64, description="N; the group has N (C) or 2N (D) elements")


class ScalesConfig(Section):
    levels: int = Field(3, ge=2, le=6, description="K: the backbone runs, with shared weights, on the image "
                        "down-scaled by 1, 2, ..., 2^(K-1) (average pooling); its K pooled outputs are scale fibres")


class ViTConfig(Section):
    """model.backbone: vit, a vision transformer (timm's VisionTransformer) built to the recipe's image size."""

    patch_size: int = Field(4, ge=1, le=64, description="P: pixels per side of a patch; the token grid is "
                            "data.image_size / P on a side (8 x 8 for 32-px images)")
    width: Width = Field(192, description="token width D (ViT-Ti: 192, ViT-S: 384)")
    depth: int = Field(12, ge=1, le=48, description="transformer blocks")
    heads: int = Field(3, ge=1, le=64, description="attention heads; width must be a multiple")
    position_embedding: Literal["absolute", "none"] = Field(
        "absolute", description="absolute: learned embeddings added to the patch tokens (ViT; resampled for views "
        "of other sizes), which make the token grid depend on where a patch is; none: no position information, so "
        "attention and the per-token layers commute with shifts of the image by whole patches")
    pool: Literal["token", "avg"] = Field(
        "token", description="pooled features f(x): token, the class token after the last block (ViT, DINO); avg, "
        "the mean of the patch tokens (what H-SSL on tokens trains)")

    @field_validator("heads")
    @classmethod
    def _heads_divide_width(cls, heads: int, info: Any) -> int:
        width = info.data.get("width")
        if width is not None and width % heads:
            raise ValueError(f"model.vit.heads={heads} must divide model.vit.width={width}")
        return heads


class ModelConfig(Section):
    backbone: str = Field(
        "resnet18_cifar", max_length=100, description="feature extractor f: resnet18_cifar, small_convnet (quick "
        "CPU runs), vit (a vision transformer sized by model.vit), e2_convnet or e2_resnet18 (equivariant to "
        "model.group, escnn), or any model of timm or "
        "torchvision by name, untrained, classifier removed: timm:<name> (e.g. timm:resnet50, timm:vit_small_patch16_"
        "224), torchvision:<name> (e.g. torchvision:resnet50)"
    )
    projector: list[Width] = Field(
        [2048, 2048, 128], min_length=1, description="widths of the projector g's layers; the last is z's size"
    )
    group: GroupConfig | None = Field(None, description="symmetry group of e2_* backbones and of H-SSL's fibres")
    widths: list[Width] | None = Field(
        None, min_length=1, description="e2_* backbones: regular fields per stage (|G| channels each); default "
        "e2_convnet [16, 32, 64], e2_resnet18 [16, 32, 64, 128]"
    )
    sync_bn: Literal["heads", "all", "none"] = Field(
        "heads", description="multi-GPU runs: which BatchNorm layers become SyncBatchNorm; heads: those outside "
        "the backbone (projector, predictor), whose batch statistics the losses need global; all: every one; none")
    vit: ViTConfig | None = Field(
        None, description="backbone vit: its patch size, width, depth, heads, position embedding and pooling (unset: "
        "ViT-Ti/4 with absolute position embeddings and the class token)")
    scales: ScalesConfig | None = Field(
        None, description="multi-scale lifting of a plain CNN backbone (scale equivariance, H-SSL's "
        "method.fibres: scales): e.g. {levels: 3}; the probe reads the max over levels")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        library, _, model = name.partition(":")
        if name in BUILT_IN_BACKBONES or (library in ("timm", "torchvision") and re.fullmatch(r"[\w.\-]+", model)):
            return name
        close = difflib.get_close_matches(name, BUILT_IN_BACKBONES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        library_form = f"timm:{name} or torchvision:{name}" if ":" not in name else "timm:<name> or torchvision:<name>"
        raise ValueError(f"unknown backbone '{name}'; {hint}choose {', '.join(BUILT_IN_BACKBONES)}, or a library's "
                         f"model: {library_form}")




class OptimConfig(Section):
    name: Literal["sgd", "lars", "adamw"] = Field("lars", description="optimiser")
    lr: float = Field(0.3, gt=0, le=100, description="peak learning rate, reached after the warm-up")
    weight_decay: float = Field(1e-6, ge=0, le=10, description="weight decay (L2 for sgd/lars, decoupled for adamw)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum (sgd, lars)")
    betas: FloatPair = Field((0.9, 0.999), description="Adam betas (adamw)")
    warmup_epochs: float = Field(10.0, ge=0, le=100_000, description="linear warm-up length, then a cosine decay")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="lr at the end, as a fraction of optim.lr")
    lars_trust: float = Field(1e-3, gt=0, le=1, description="LARS trust coefficient eta")
    exclude_bias_and_norm: bool = Field(
        True, description="no weight decay and no LARS scaling for biases and normalisation weights"
    )

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must both lie in [0, 1), got {list(betas)}")
        return betas


class MonitorConfig(Section):
    """An online check that training helps: kNN (and optionally linear) top-1 of the frozen backbone features,
    fitted on `samples` train images and scored on `samples` images of `split`, every `every` epochs."""

    every: int = Field(1, ge=1, le=100_000, description="epochs between evaluations (and always after the last)")
    knn: bool = Field(True, description="cosine kNN (k = 20, temperature 0.07), as hssl probe's")
    linear: bool = Field(False, description="also a linear probe (L-BFGS softmax regression, as hssl probe's)")
    split: str = Field("test", description="split to score on; the train split gives held-out train images "
                       "disjoint from the fitted ones, the split to choose settings on")
    samples: int = Field(2000, ge=10, le=1_000_000, description="images fitted on and images scored (fixed, seeded)")


class TrainConfig(Section):
    epochs: int = Field(100, ge=0, le=100_000,
        description="passes over the training split; 0 writes the initialised model "
                    "(the untrained baseline a comparison needs)")
    batch_size: int = Field(256, ge=2, le=1_000_000, description="images per step (each gives two views)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast and channels_last on CUDA, fp32 on the CPU"
    )
    compile: Literal["auto"] | bool = Field(
        False, description="torch.compile the model and the augmentation (pays off on long GPU runs); auto: on "
                           "CUDA only (on a CPU compiling costs minutes and gains little)")
    checkpoint_every: int = Field(10, ge=1, le=100_000,
        description="write epoch-NNNN.safetensors every this many epochs")
    log_every: int = Field(10, ge=1, le=1_000_000, description="steps between rows of the JSONL metrics log")
    monitor: MonitorConfig | None = Field(
        None, description="online kNN/linear evaluation while training, e.g. monitor: {every: 1}; null: off")
    diagnostics_every: int = Field(
        5, ge=0, le=100_000,
            description="epochs between collapse diagnostics on a held batch, logged to metrics.jsonl; 0: off"
    )
    loggers: list[Literal["jsonl", "csv", "tensorboard", "wandb"]] = Field(
        ["jsonl"], max_length=4,
        description="where metric rows go: metrics.jsonl always; csv (metrics.csv), tensorboard (<run>/tensorboard/) "
                    "and wandb (when installed) besides, e.g. loggers: [jsonl, tensorboard]")

    @field_validator("loggers")
    @classmethod
    def _wandb_installed(cls, loggers: list[str]) -> list[str]:
        import importlib.util

        if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is not installed here; pip install wandb, or leave wandb out of the list")
        return loggers
