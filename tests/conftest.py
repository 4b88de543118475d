import pytest
import torch

from hssl_cli.recipe import parse_recipe

TINY_RECIPE = """
name: tiny
seed: 3
data: {dataset: digits, image_size: 16}
augment: {crop_scale: [0.5, 1.0], flip: 0.0, grayscale: 0.0,
          color_jitter: {p: 0.8, brightness: 0.4, contrast: 0.4, saturation: 0.0, hue: 0.0}}
model: {backbone: small_convnet, projector: [64, 32]}
method: {name: simclr, temperature: 0.2}
optim: {name: adamw, lr: 2.0e-3, weight_decay: 1.0e-4, warmup_epochs: 1}
train: {epochs: 2, batch_size: 128, checkpoint_every: 1, log_every: 3}
"""


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.set_num_threads(1)  # bit-exact comparisons across runs in one process
    yield


@pytest.fixture(autouse=True)
def _feature_cache_in_tmp(tmp_path_factory, monkeypatch):
    """hssl probe caches features; tests keep theirs out of ~/.cache."""
    monkeypatch.setenv("HSSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hssl-cache"))


@pytest.fixture
def tiny_recipe():
    def make(*overrides: str):
        return parse_recipe(TINY_RECIPE, "tiny.yaml", overrides=list(overrides))

    return make


@pytest.fixture
def colour_folder(tmp_path):
    """An image folder of 3-channel 16 px PNGs, two classes, 24 train and 8 test images."""
    from tests.test_sources import random_image, write_image

    root = tmp_path / "colour"
    for index in range(32):
        split = "train" if index < 24 else "test"
        write_image(root / split / f"class{index % 2}" / f"{index}.png", random_image(3, 16, 16, seed=index))
    return root


def train_stopped_and_resumed(recipe, root, stop_step: int):
    """Train `recipe` once whole, once stopped at `stop_step` and resumed with --resume auto; returns the
    RunResults (whole, stopped, resumed), for bit-exact resume tests."""
    from hssl_cli.engine.train import StopRequest, pretrain

    whole = pretrain(recipe, root / "whole", device_name="cpu")
    stop = StopRequest()
    stopped = pretrain(recipe, root / "split", device_name="cpu", stop=stop,
                       progress=lambda row: stop() if row["step"] >= stop_step else None)
    resumed = pretrain(recipe, root / "split", device_name="cpu", resume="auto")
    return whole, stopped, resumed


TINY_VIT = "{patch_size: 4, width: 16, depth: 2, heads: 2, position_embedding: none, pool: avg}"
C4_BACKBONE = "model={backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], projector: [16, 8]}"

# --set overrides of TINY_RECIPE that train each method name of the registry (and the variants whose
# protocol differs: EquiMod reads x0, multi-crop reads local views, H-SSL's fibres read only x0; E-SSL rotates
# its own local views, or x0 with one rotation drawn per image).
METHOD_OVERRIDES = {
    "simclr": [],
    "simclr+equimod": ["method.equimod={projector: [32, 16], param_embedding: 8}"],
    "simclr+equimod_permuted": ["method.equimod={projector: [32, 16], param_embedding: 8, params: permuted}"],
    "simclr+multicrop": ["views=[{}, {}, {size: 8, count: 3, crop_scale: [0.1, 0.4]}]"],
    "byol": ["method={name: byol, predictor: [64, 32]}"],
    "byol+simsiam": ["method={name: byol, predictor: [64, 32], ema: false}"],
    "byol+multicrop": ["method={name: byol, predictor: [64, 32]}", "views=[{}, {}, {size: 8, count: 2}]"],
    "simclr+essl": ["views=[{}, {}, {size: 8}]", "method.essl={head: [16]}"],
    "byol+essl": ["method={name: byol, predictor: [64, 32], essl: {head: [16], views: original, rotations: one}}"],
    "vicreg": ["method={name: vicreg}"],
    "barlow_twins": ["method={name: barlow_twins}"],
    "mocov3": ["method={name: mocov3, temperature: 0.5, predictor: [64, 32]}"],
    "mocov3+multicrop": ["method={name: mocov3, temperature: 0.5, predictor: [64, 32]}",
                         "views=[{}, {}, {size: 8, count: 2, crop_scale: [0.1, 0.4]}]"],
    "directpred": ["method={name: directpred}"],
    "directpred+every3": ["method={name: directpred, predictor_every: 3, eps_convention: outside}"],
    "directcopy": ["method={name: directcopy}"],
    "directpred+isoloss": ["method={name: directpred, loss: iso}"],
    "directpred+multicrop": ["method={name: directpred, loss: iso}", "views=[{}, {}, {size: 8, count: 2}]"],
    "hssl": [C4_BACKBONE, "method={name: hssl}"],
    "hssl+fibres": [C4_BACKBONE, "method={name: hssl, pairing: fibres, loss: vicreg}"],
    "hssl+shuffled": [C4_BACKBONE, "method={name: hssl, structure: shuffled}"],
    "hssl+positions": ["method={name: hssl, fibres: positions, structure: removed}"],
    "hssl+roto_translations": [C4_BACKBONE, "method={name: hssl, fibres: group_and_positions}"],
    "hssl+scales": ["model.scales={levels: 2}", "method={name: hssl, fibres: scales}"],
    "equivariant_pretext": [C4_BACKBONE, "method={name: equivariant_pretext, contrastive_weight: 1.0}"],
    "equivariant_pretext+rotnet_plain": [C4_BACKBONE, "method={name: equivariant_pretext, head: flattened, "
                                         "structure: removed}"],
    "invariant_contrastive": [C4_BACKBONE, "method={name: invariant_contrastive}"],
    # the prototypes freeze for the first half epoch and tau_t warms up over 2: both change within a run
    "dino": ["method={name: dino, prototypes: 48, freeze_last_layer: 0.5, teacher_temperature: 0.07, "
             "warmup_teacher_temperature_epochs: 2}"],
    # a vit: H-SSL on the patch tokens of its first block; DINO with local crops (position embeddings resampled)
    "hssl+vit_tokens": [f"model={{backbone: vit, vit: {TINY_VIT}, projector: [64, 32]}}",
                        "method={name: hssl, fibres: positions, fibres_from: block0}"],
    "dino+vit": ["model={backbone: vit, vit: {patch_size: 4, width: 16, depth: 2, heads: 2}, projector: [64, 32]}",
                 "method={name: dino, prototypes: 48}", "views=[{}, {}, {size: 8, count: 2, crop_scale: [0.1, 0.4]}]"],
    "dino+multicrop": ["method={name: dino, prototypes: 48, norm_last_layer: false, head_batchnorm: true}",
                       "views=[{}, {}, {size: 8, count: 3, crop_scale: [0.1, 0.4]}]"],
}


@pytest.fixture
def nan_loss(monkeypatch):
    """SimCLR's loss becomes NaN (with a gradient) from the first step: a diverging run without an absurd
    learning rate, which the schema refuses."""
    import hssl_cli.methods.simclr as simclr

    monkeypatch.setattr(simclr, "info_nce", lambda z1, z2, *args, **kwargs: (z1 + z2).sum() * float("nan"))
