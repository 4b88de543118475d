"""A suite: recipes x `--set` overrides x an optional swept key x seeds, one pretrain + evaluation per
cell. It is how every table in docs/ is made. Loading validates the suite and every cell's recipe
without importing torch, so a bad suite fails in a fraction of a second, with the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from hssl_cli.errors import HsslError, RecipeError
from hssl_cli.recipe import (
    DatasetName,
    Recipe,
    Section,
    describe_validation_error,
    load_recipe,
    read_text_file,
    read_yaml_mapping,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class Variant(Section):
    """One row of the comparison: a recipe and the overrides that make this variant."""

    name: str = Field(pattern=NAME_PATTERN, description="the variant's name in tables and folder names")
    recipe: str = Field(description="recipe file, relative to the suite file")
    set: list[str] = Field([], description="overrides, as for --set, applied after the suite's own")
    label: str | None = Field(None, description="longer text for the table (default: the name)")


class SweptKey(Section):
    """A recipe key taken through several values for every variant (e.g. optim.lr)."""

    key: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
                     description="dotted recipe key")
    values: list[Any] = Field(min_length=1, description="values, typed by the recipe schema")


class ProbeSettings(Section):
    """The probe of each cell (hssl probe): linear + kNN on frozen features, or fine-tuning."""

    protocol: Literal["fast", "standard", "finetune"] = Field(
        "fast", description="fast: L-BFGS on standardised features; standard: the papers' SGD linear evaluation "
        "with crop and flip (see epochs, lr, batch_size, weight_decay; slow on a CPU); finetune: backbone and linear "
        "head trained end to end (also backbone_lr_scale, optimizer; not comparable with the frozen protocols)")
    epochs: int = Field(100, ge=1, le=10_000, description="protocol standard / finetune: epochs of training "
                        "(finetune's default: 30)")
    lr: float = Field(0.1, gt=0, le=100, description="protocol standard / finetune: learning rate (finetune: the "
                      "head's) for batch 256 (finetune's default: 0.05 with sgd, 1e-3 with adamw)")
    batch_size: int = Field(256, ge=2, le=65_536, description="protocol standard / finetune: images per step")
    weight_decay: float = Field(0.0, ge=0, le=10, description="protocol standard / finetune: weight decay")
    backbone_lr_scale: float = Field(0.1, ge=0, le=10, description="protocol finetune: the backbone's learning "
                                     "rate as a multiple of the head's")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="protocol finetune: sgd (Nesterov) or adamw")
    labels: str = Field("100%", pattern=r"^\s*[0-9.]+%\s*$", description="the percentage of each class's train "
                        "labels kept (a fixed, seeded subset), e.g. 10%: the low-label protocols")

    features: Literal["backbone", "projector"] = Field("backbone", description="what is probed")
    train_samples: int | None = Field(None, ge=10, description="a fixed random subset of train (default: all)")
    test_samples: int | None = Field(None, ge=10, description="a fixed random subset of test (default: all)")
    test_rotations: list[float] = Field([], description="also score on test images rotated by these degrees")
    validation: bool = Field(
        False, description="score on held-out train images instead of test: for choosing settings")
    exact_kernel_knn: bool = Field(
        False, description="kernel-regime cells: also a kNN under the exact base kernel (knn_k20_exact_kernel)")
    dataset: str | None = Field(None, description="probe on another dataset than the recipe's")
    data_root: str | None = Field(None, description="its folder")

    @model_validator(mode="after")
    def _checked_with_protocol_defaults(self) -> ProbeSettings:
        """labels is a percentage in (0, 100]; finetune takes no frozen-feature evaluation, and its epochs and lr
        default to its own (30; 0.05 or 1e-3), not the linear evaluation's, unless the suite sets them."""
        from hssl_cli.evaluate.commands.probe import label_fraction
        from hssl_cli.evaluate.measures.finetune_protocol import DEFAULT_LR, FinetuneProtocol

        try:
            label_fraction(self.labels)
        except HsslError as error:
            raise ValueError(str(error).replace("--labels", "labels:", 1)) from None
        if self.protocol == "finetune" and (self.features != "backbone" or self.exact_kernel_knn):
            raise ValueError("protocol finetune tunes the backbone and its own head: features: projector and "
                             "exact_kernel_knn are frozen-feature evaluations; use protocol fast for them")
        if self.protocol == "finetune":
            if "epochs" not in self.model_fields_set:
                self.epochs = FinetuneProtocol.epochs
            if "lr" not in self.model_fields_set:
                self.lr = DEFAULT_LR[self.optimizer]
        return self


class TransferProbe(ProbeSettings):
    """One more probe of each cell's checkpoint, on a dataset of its own (as hssl probe --dataset --data-root),
    with any of probe:'s settings (protocol included, passed to the probe as it is): its results are the metrics
    transfer/<name>/<result> (transfer/cifar100/linear, transfer/stl10/knn_k20, ...)."""

    name: str | None = Field(None, pattern=NAME_PATTERN,
                             description="the middle of its metrics' names (default: the dataset)")
    dataset: DatasetName = Field(description="the dataset probed, a data.dataset value (cifar100, stl10, ...)")
    data_root: str | None = Field(None, description="its folder (default: the recipe's data.root where dataset is "
                                  "the recipe's own)")

    @property
    def key(self) -> str:
        """The name in its metrics (transfer/<key>/linear) and in a result's `transfer` mapping."""
        return self.name or self.dataset


class CollapseSettings(Section):
    samples: int = Field(1024, ge=2, description="images of the test split measured")


class ReportSettings(Section):
    metrics: list[str] = Field(
        ["linear", "knn_k20"], min_length=1,
        description="columns: probe results (linear, knn_k20, linear@rot17, ...), train/<logged loss> "
        "(train/loss, train/equimod/gain), collapse/<layer>/<metric>, equivariance/<metric>")
    plot: str | None = Field(None, description="the metric drawn in report.png (default: the first)")
    curve: str | None = Field(None, description="a train.monitor metric drawn against epoch in report-curve.png, "
                              "mean ± std over seeds per variant (e.g. monitor/knn_k20_top1); its value at epoch E "
                              "is the metric '<name>@E' for report.metrics and claims")


class ClaimSpec(Section):
    """A claim the suite tests: variant a against variant b on one metric, decided from seed-paired cells by
    the fixed rule of hssl_cli/sweep/claims.py (greater: the 95% interval of a - b excludes 0; equivalent: it
    lies inside ±margin). Fix the margin before any cell runs."""

    a: str = Field(description="variant name: the left side of the claim")
    b: str = Field(description="variant name: the right side")
    metric: str = Field("linear", description="a report metric (linear, knn_k20, train/loss, ...)")
    metric_b: str | None = Field(None, description="b's metric when it is another one than a's (e.g. a kNN under "
                                 "the exact base kernel, knn_k20_exact_kernel); default: metric")
    test: Literal["greater", "equivalent"] = Field(description="greater: a > b; equivalent: |a - b| < margin")
    margin: float | None = Field(None, gt=0, description="equivalent: the margin m, in the metric's units")
    value: Any = Field(None, description="with a swept key: the value the claim is tested at (default: each value)")
    label: str | None = Field(None, description="the claim in words, printed beside its verdict")


class AugmentationProbeSettings(Section):
    samples: int = Field(4096, ge=20, description="train images: regression fitted on half, R² on the other half")


class Suite(Section):
    name: str = Field(pattern=NAME_PATTERN, description="output folder: <output>/<name>/")
    description: str = Field("", description="the claim the suite tests, printed above its table")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="every variant runs once per seed")
    set: list[str] = Field([], description="overrides applied to every cell (the shared budget)")
    variants: list[Variant] = Field(min_length=1)
    sweep: SweptKey | None = Field(None, description="a key swept for every variant")
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    collapse_report: CollapseSettings | None = Field(None, description="also run collapse-report per cell")
    equivariance_check: bool = Field(False, description="also run equivariance-check per cell")
    transfer: list[TransferProbe] = Field(
        [], description="more probes of each cell's checkpoint, each on a dataset (and protocol) of its own: "
        "metrics transfer/<name>/<result>, e.g. transfer/cifar100/linear")
    augmentation_probe: AugmentationProbeSettings | None = Field(
        None, description="also predict the augmentation parameters from [f(x), f(t(x))] per cell (hssl probe "
        "--augmentation): metrics augmentation/r2 and augmentation/r2/<group>")
    report: ReportSettings = Field(default_factory=ReportSettings)
    claims: list[ClaimSpec] = Field([], description="claims decided from seed-paired cells (hssl sweep --report)")

    @model_validator(mode="after")
    def _names_unique(self) -> Suite:
        names = [variant.name for variant in self.variants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"variants: names must be unique, '{repeated[0]}' is used twice")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        transfer = [probe.key for probe in self.transfer]
        repeated = sorted({key for key in transfer if transfer.count(key) > 1})
        if repeated:
            raise ValueError(f"transfer: two probes are named '{repeated[0]}'; give each its own name")
        if self.report.plot is not None and self.report.plot not in self.report.metrics:
            raise ValueError(f"report.plot '{self.report.plot}' must be one of report.metrics {self.report.metrics}")
        for number, claim in enumerate(self.claims):
            where = f"claims.{number}"
            for side in (claim.a, claim.b):
                if side not in names:
                    raise ValueError(f"{where}: no variant '{side}' (variants: {', '.join(names)})")
            if claim.a == claim.b and (claim.metric_b or claim.metric) == claim.metric:
                raise ValueError(f"{where}: a and b are both '{claim.a}'; a claim compares two variants")
            if (claim.test == "equivalent") != (claim.margin is not None):
                raise ValueError(f"{where}: test equivalent needs a margin, test greater takes none "
                                 f"(got test {claim.test}, margin {claim.margin})")
            if claim.value is not None and (self.sweep is None or claim.value not in self.sweep.values):
                raise ValueError(f"{where}: value {claim.value!r} is not a value of the swept key "
                                 f"({self.sweep.values if self.sweep else 'the suite sweeps no key'})")
        return self


@dataclass
class Cell:
    index: int
    variant: Variant
    key: str | None  # the swept key, None without a sweep
    value: Any  # its value in this cell
    seed: int
    recipe: Recipe  # resolved: recipe file + suite overrides + variant overrides + value + seed
    overrides: list[str]

    @property
    def id(self) -> str:
        """Folder name: variant[-key=value]-seed<seed>, filesystem-safe."""
        swept = f"-{self.key.rsplit('.', 1)[-1]}={self.value}" if self.key is not None else ""
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{self.variant.name}{swept}-seed{self.seed}")


@dataclass
class LoadedSuite:
    path: Path
    suite: Suite
    cells: list[Cell]

    @property
    def name(self) -> str:
        return self.suite.name


def load_suite(path: str | Path, overrides: list[str] | None = None) -> LoadedSuite:
    """Read and validate a suite file and resolve every cell's recipe; errors name the file and line.
    `overrides` (the command line's --set) apply to every cell after the suite's and the variant's own."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such suite file (see the suites/ folder for examples)")
    text = read_text_file(path, "suite")
    raw, lines = read_yaml_mapping(text, str(path), "a suite is a YAML mapping (name, variants, ...)")
    raw.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(describe_validation_error(error, str(path), lines, Suite)) from None
    cells = []
    for number, variant in enumerate(suite.variants):
        where = f"{path}:{lines.get(('variants', str(number)), '?')}: variant '{variant.name}'"
        recipe_path = (path.parent / variant.recipe).resolve()
        if not recipe_path.is_file():
            raise RecipeError(f"{where}: no recipe file {variant.recipe} (paths are relative to the suite file)")
        key = suite.sweep.key if suite.sweep is not None else None
        values = suite.sweep.values if suite.sweep is not None else [None]
        for value in values:
            for seed in suite.seeds:
                cell_overrides = [*suite.set, *variant.set]
                if key is not None:
                    cell_overrides.append(f"{key}={_as_yaml(value)}")
                cell_overrides += [*(overrides or []), f"seed={seed}"]
                try:
                    recipe = load_recipe(recipe_path, cell_overrides)
                except RecipeError as error:
                    raise RecipeError(f"{where}: {error}") from None
                _check_transfer_roots(suite, recipe, path, lines)
                cells.append(Cell(len(cells), variant, key, value, seed, recipe, cell_overrides))
    return LoadedSuite(path, suite, cells)


def _check_transfer_roots(suite: Suite, recipe: Recipe, path: Path, lines: dict) -> None:
    """A transfer probe of another dataset than the cell's names its folder: refused now, not after pretraining."""
    for number, probe in enumerate(suite.transfer):
        if probe.data_root is None and probe.dataset not in ("digits", recipe.data.dataset):
            raise RecipeError(f"{path}:{lines.get(('transfer', str(number)), '?')}: transfer '{probe.key}' needs "
                              f"data_root, the folder of its {probe.dataset} files")


def _as_yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
