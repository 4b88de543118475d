"""The whole recipe: the top-level schema and what the engine asks of a resolved recipe (its YAML form, the
keys two recipes differ in, the keys a resume may change)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, model_validator

from hssl_cli.recipe.methods import MULTI_CROP_METHODS, MethodConfig, SimCLRConfig
from hssl_cli.recipe.sections import (
    AugmentConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ResolvedView,
    Section,
    TrainConfig,
    ViewSpec,
    ViTConfig,
)

MAX_FEATURES = 2048  # the widest backbone output (e2_resnet18 at |G| = 16); bounds a head's first layer
MAX_HEAD_BYTES = 8 * 2**30


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100,
                      description="run name; the output folder")
    seed: int = Field(0, ge=0, le=2**63 - 1,
        description="seed of the data order, the augmentations and the initial weights")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    views: list[ViewSpec] | None = Field(
        None, min_length=1, description="per-view pipelines (asymmetric views, multi-crop), each overriding augment:; "
        "null: as many global views as the method reads, all drawn with augment:")
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=SimCLRConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _sections_fit(self) -> Recipe:
        model = self.model
        if self.data.dataset != "digits" and self.data.root is None:
            raise ValueError(f"data.root is required for dataset '{self.data.dataset}'")
        if model.scales is not None:
            self._scales_fit(model)
        equivariant = model.backbone.startswith("e2_")
        if equivariant and model.group is None:
            raise ValueError(f"model.group is required for model.backbone '{model.backbone}'; "
                             "e.g. group: {name: C, order: 8}")
        if model.widths is not None and not equivariant:
            raise ValueError(f"model.widths: only e2_* backbones take widths, not '{model.backbone}'; remove it")
        if model.backbone == "e2_resnet18" and model.widths is not None and len(model.widths) != 4:
            raise ValueError(f"model.widths: e2_resnet18 has 4 stages, got {len(model.widths)} widths")
        self._vit_fits(model)
        if 0 < self.train.epochs < self.optim.warmup_epochs:
            raise ValueError(f"optim.warmup_epochs={self.optim.warmup_epochs:g} exceeds train.epochs="
                             f"{self.train.epochs}: the learning rate would never reach optim.lr; shorten the warm-up")
        self.method.check(self)
        self._views_fit_the_method()
        self._heads_fit_in_memory()
        return self

    def _vit_fits(self, model: ModelConfig) -> None:
        if model.vit is not None and model.backbone != "vit":
            raise ValueError(f"model.vit sizes the vit backbone, not '{model.backbone}'; remove it or set "
                             "model.backbone: vit")
        vit = model.vit or ViTConfig()
        patch = vit.patch_size
        if model.backbone != "vit":
            return
        weights = 12 * vit.depth * vit.width**2  # per block: qkv and projection 4 D^2, the MLP 8 D^2
        if 4 * weights > MAX_HEAD_BYTES:
            raise ValueError(f"model.vit: width {vit.width} and depth {vit.depth} make about {weights:.2g} weights "
                             f"({4 * weights / 2**30:.0f} GiB in float32), over the {MAX_HEAD_BYTES // 2**30} GiB "
                             "bound; ViT-g/14 (width 1408, depth 40) has 1e9")
        for name, size in [("data.image_size", self.data.image_size), *(
                ("views: size", view.size) for view in self.views or [] if view.size is not None)]:
            if size % patch:
                raise ValueError(f"model.vit.patch_size={patch} must divide {name}={size}: the token grid covers "
                                 "the whole image")

    def _scales_fit(self, model: ModelConfig) -> None:
        if model.backbone not in ("small_convnet", "resnet18_cifar") and not model.backbone.startswith(
                ("timm:", "torchvision:")):
            raise ValueError(f"model.scales lifts a plain CNN (small_convnet, resnet18_cifar, timm:/torchvision:), "
                             f"not '{model.backbone}'; remove model.scales or change model.backbone")
        coarsest = 2 ** (model.scales.levels - 1)
        if self.data.image_size % coarsest or self.data.image_size // coarsest < 8:
            raise ValueError(f"model.scales.levels={model.scales.levels}: data.image_size {self.data.image_size} must "
                             f"be divisible by {coarsest} and leave at least 8 px at the coarsest level; use fewer "
                             "levels")

    def _heads_fit_in_memory(self) -> None:
        """Each MLP head's float32 weights, estimated from its widths (the backbone's features counted as
        MAX_FEATURES wide), must stay below MAX_HEAD_BYTES: a typo such as 1e14 is refused here, not by the
        allocator."""
        heads = {"model.projector": [MAX_FEATURES, *self.model.projector],
                 **self.method.extra_heads(self.model.projector[-1], MAX_FEATURES)}
        for key, widths in heads.items():
            weights = sum(a * b for a, b in zip(widths, widths[1:], strict=False))
            if 4 * weights > MAX_HEAD_BYTES:
                raise ValueError(f"{key}: layers of widths {widths[1:]} hold about {4 * weights / 2**30:.0f} GiB "
                                 f"of weights, more than {MAX_HEAD_BYTES // 2**30} GiB; use narrower layers")

    def _views_fit_the_method(self) -> None:
        if self.views is None:
            return
        resolved = self.resolved_views()
        consumes = self.method.consumes
        global_count = sum(view.count for view in resolved if view.role == "global")
        local_count = sum(view.count for view in resolved if view.role == "local")
        if global_count != consumes.global_views:
            raise ValueError(f"views: method {self.method.name} reads {consumes.global_views} global view(s), the "
                             f"views list has {global_count}; list {consumes.global_views} at data.image_size")
        if local_count and not consumes.local_views:
            raise ValueError(f"views: method {self.method.name} takes no local (multi-crop) views, the views list "
                             f"has {local_count}; remove them or use a multi-crop method "
                             f"({', '.join(MULTI_CROP_METHODS)})")

    def resolved_views(self) -> list[ResolvedView]:
        """The views the engine draws each step, in order: `views:` made concrete, or the method's global views
        all drawn with augment: at data.image_size."""
        if self.views is None:
            view = ResolvedView(augment=self.augment, size=self.data.image_size, count=1, role="global")
            return [view] * self.method.consumes.global_views
        resolved = []
        for index, spec in enumerate(self.views):
            size = spec.size or self.data.image_size
            role = spec.role or ("global" if size == self.data.image_size else "local")
            try:
                augment = spec.augment_config(self.augment)
            except ValueError as error:
                raise ValueError(f"views.{index}.{error}") from None
            resolved.append(ResolvedView(augment=augment, size=size, count=spec.count, role=role))
        return resolved


# Keys that may change between a run and its resumption without altering the result.
RESUME_SAFE_KEYS = frozenset(
    {"data.root", "data.storage", "data.workers", "train.checkpoint_every", "train.log_every", "train.compile",
     "train.diagnostics_every", "train.monitor", "train.loggers"}
)


def resume_safe(key: str) -> bool:
    """Whether a dotted key (or a key inside a section, e.g. train.monitor.every) may change on resume."""
    return any(key == safe or key.startswith(f"{safe}.") for safe in RESUME_SAFE_KEYS)

def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every key, defaults included; stored in each checkpoint."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def changed_keys(old: Recipe, new: Recipe) -> list[str]:
    """Dotted keys whose values differ between two recipes."""
    old_flat, new_flat = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(key for key in old_flat.keys() | new_flat.keys() if old_flat.get(key) != new_flat.get(key))


def describe_changes(old: Recipe, new: Recipe, keys: list[str]) -> str:
    """`key (old -> new)` for each of `keys`, e.g. to say why a resume is refused."""
    old_flat, new_flat = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return ", ".join(f"{key} ({old_flat.get(key)!r} -> {new_flat.get(key)!r})" for key in keys)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


