"""The recipe: one typed schema for every experiment, loaded from YAML, overridable with `--set`.

The schema is the truth (DESIGN.md shows an illustrative recipe): `sections` (data, augment, views, model,
optim, train), `method_base` (the base of every method config, what a method consumes and the cross-field
checks methods share), `methods` (one config per method, with its cross-field checks, and the `MethodConfig`
union) and `equivariant_methods` (those of the equivariant-network methods: H-SSL, the equivariant pretext
task, the invariant contrastive loss), `schema` (the whole recipe), `loading` (YAML, overrides, one-line errors
naming file:line, the dotted key and a fix), `strict_yaml` (the YAML loader of recipes and suites, which refuses
what YAML 1.1 would silently reinterpret). No torch is imported, so `hssl pretrain bad.yaml` fails in a fraction
of a second.
"""

from hssl_cli.errors import RecipeError
from hssl_cli.recipe.equivariant_methods import (
    EquivariantPretextConfig,
    HSSLConfig,
    HSSLPairsConfig,
    InvariantContrastiveConfig,
)
from hssl_cli.recipe.loading import (
    MAX_TEXT_FILE_BYTES,
    describe_validation_error,
    load_recipe,
    parse_recipe,
    read_text_file,
    read_yaml_mapping,
)
from hssl_cli.recipe.method_base import Consumes, MethodSection
from hssl_cli.recipe.methods import (
    BarlowTwinsConfig,
    BYOLConfig,
    DirectCopyConfig,
    DirectPredConfig,
    EquiModConfig,
    EsslConfig,
    KernelConfig,
    MethodConfig,
    MoCoV3Config,
    SimCLRConfig,
    VICRegConfig,
)
from hssl_cli.recipe.schema import (
    RESUME_SAFE_KEYS,
    Recipe,
    changed_keys,
    describe_changes,
    recipe_to_yaml,
    resume_safe,
)
from hssl_cli.recipe.sections import (
    AugmentConfig,
    BlurConfig,
    ColorJitterConfig,
    DataConfig,
    DatasetName,
    GroupConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    ResolvedView,
    ScalesConfig,
    Section,
    TrainConfig,
    ViewSpec,
    ViTConfig,
)

__all__ = [
    "AugmentConfig",
    "BarlowTwinsConfig",
    "BlurConfig",
    "BYOLConfig",
    "changed_keys",
    "ColorJitterConfig",
    "Consumes",
    "DataConfig",
    "DatasetName",
    "describe_changes",
    "describe_validation_error",
    "DirectCopyConfig",
    "DirectPredConfig",
    "EquiModConfig",
    "EquivariantPretextConfig",
    "EsslConfig",
    "GroupConfig",
    "HSSLConfig",
    "HSSLPairsConfig",
    "InvariantContrastiveConfig",
    "KernelConfig",
    "load_recipe",
    "MAX_TEXT_FILE_BYTES",
    "MethodConfig",
    "MethodSection",
    "MoCoV3Config",
    "ModelConfig",
    "ViTConfig",
    "MonitorConfig",
    "OptimConfig",
    "parse_recipe",
    "read_text_file",
    "read_yaml_mapping",
    "Recipe",
    "recipe_to_yaml",
    "resume_safe",
    "RecipeError",
    "ResolvedView",
    "RESUME_SAFE_KEYS",
    "ScalesConfig",
    "Section",
    "SimCLRConfig",
    "TrainConfig",
    "VICRegConfig",
    "ViewSpec",
]
