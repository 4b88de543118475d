import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.data.views import Views
from hssl_cli.engine.checkpoint import load_checkpoint
from hssl_cli.errors import HsslError, RecipeError
from hssl_cli.evaluate.commands.probe import probe_checkpoint
from hssl_cli.methods import build_method
from hssl_cli.methods.fibres import draw_pairs
from hssl_cli.recipe import parse_recipe
from tests.conftest import train_stopped_and_resumed

C4_MODEL = "model: {backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], projector: [16, 8]}\n"


def _method(method: str, model: str = C4_MODEL, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(parse_recipe(model + f"method: {method}\n", "x.yaml"), in_channels=1)


def _pairs(group, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    g1 = torch.randint(0, group.size, (batch,), generator=generator)
    return g1, (g1 + torch.randint(1, group.size, (batch,), generator=generator)) % group.size


@pytest.mark.parametrize("loss", ["nt_xent", "vicreg", "byol"])
def test_fibre_pairing_equals_the_augmented_pair_construction_for_90_degree_rotations(loss):
    """The paper's identity: z_e(T_g x) = z_{g^-1}(x) on a C4 backbone, so SSL on the inputs
    (T_g1 x, T_g2 x) and H-SSL on the fibres (g1^-1, g2^-1) of one pass give the same loss and gradients,
    in training mode too (per-field batch statistics are invariant)."""
    extra = ", predictor: [16, 8]" if loss == "byol" else ""
    hssl = _method(f"{{name: hssl, loss: {loss}, pairing: fibres{extra}}}")
    assl = _method(f"{{name: hssl, loss: {loss}, pairing: inputs{extra}}}")
    images = torch.randn(16, 1, 12, 12)
    g1, g2 = _pairs(hssl.group, 16)
    inverses = hssl.group.inverses
    fibres = hssl.fibre_pair(hssl.backbone, images, images, inverses[g1], inverses[g2])
    augmented = assl.fibre_pair(assl.backbone, images, images, g1, g2)
    for from_fibres, from_inputs in zip(fibres, augmented, strict=True):
        assert torch.allclose(from_fibres, from_inputs, atol=1e-5)
    hssl_loss = hssl.pair_losses(images, images, inverses[g1], inverses[g2])["loss"]
    assl_loss = assl.pair_losses(images, images, g1, g2)["loss"]
    assert abs(hssl_loss.item() - assl_loss.item()) < 1e-5
    hssl_loss.backward()
    assl_loss.backward()
    for (name, a), b in zip(hssl.backbone.named_parameters(), assl.backbone.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    # with other fibres than the inverse elements the two constructions differ
    other = hssl.pair_losses(images, images, g1, g2)["loss"]
    assert abs(other.item() - assl_loss.item()) > 1e-4


def test_structure_removed_pairs_pseudo_fibres_of_a_plain_backbone():
    ablation = _method("{name: hssl, structure: removed, pairing: fibres}")
    assert not ablation.backbone.capabilities.equivariant
    assert not any(type(module).__module__.startswith("escnn") for module in ablation.modules())
    images = torch.randn(8, 1, 12, 12)
    losses = ablation(Views([], [], original=images), torch.Generator())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(p.grad is not None for p in ablation.backbone.parameters())
    # no structure, so the identity that holds for the equivariant backbone fails here
    g1, g2 = _pairs(ablation.group, 8)
    inverses = ablation.group.inverses
    fibres = ablation.fibre_pair(ablation.backbone, images, images, inverses[g1], inverses[g2])
    augmented = ablation.fibre_pair(ablation.backbone, images, images, g1, g2, pairing="inputs")
    assert not torch.allclose(fibres[0], augmented[0], atol=1e-3)


@pytest.mark.parametrize(("method", "model"), [
    ("{name: hssl, pairing: fibres}", C4_MODEL),
    ("{name: hssl, fibres: scales}", "data: {dataset: digits, image_size: 32}\n"
     "model: {backbone: small_convnet, scales: {levels: 3}, projector: [16, 8]}\n"),
    ("{name: hssl, fibres: positions}", "data: {dataset: digits, image_size: 32}\n"
     "model: {backbone: small_convnet, projector: [16, 8]}\n"),
])
def test_structure_shuffled_changes_only_the_order_of_the_fibre_entries(method, model):
    """The ablation that changes only the structure: the same backbone and heads (the seed initialises them
    as in the kept arm), the F x C fibre entries permuted by one fixed permutation of all of them."""
    kept = _method(method, model).eval()
    shuffled = _method(method.replace("}", ", structure: shuffled}"), model).eval()
    kept_state, shuffled_state = kept.state_dict(), shuffled.state_dict()
    assert set(shuffled_state) - set(kept_state) == {"mixer.permutation"}
    assert all(torch.equal(kept_state[name], shuffled_state[name]) for name in kept_state)
    permutation = shuffled_state["mixer.permutation"]
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        fibres, pseudo = kept.fibres(kept.backbone, images), shuffled.fibres(shuffled.backbone, images)
        assert torch.equal(shuffled.backbone(images), kept.backbone(images))  # the probe reads the same features
    assert sorted(permutation.tolist()) == list(range(fibres[0].numel()))
    assert (permutation != torch.arange(len(permutation))).float().mean() > 0.5
    assert torch.equal(pseudo.flatten(1), fibres.flatten(1)[:, permutation]) and pseudo.shape == fibres.shape


def test_structure_removed_on_an_ordinary_backbone_splits_its_channels():
    model = "model: {backbone: small_convnet, group: {name: C, order: 8}, projector: [16, 8]}\n"
    ablation = _method("{name: hssl, structure: removed}", model)
    assert ablation.projector[0].in_features == 256 // 8
    with pytest.raises(HsslError, match="do not split into"):
        _method("{name: hssl, structure: removed}", model.replace("order: 8", "order: 3"))


def _draw(method: str, model: str = C4_MODEL, count: int = 4000):
    hssl = _method(method, model)
    return draw_pairs(hssl.group, hssl.pairs, count, torch.Generator().manual_seed(0), torch.device("cpu"))


def test_pairs_are_distinct_and_follow_p_of_g():
    g1, g2 = _draw("{name: hssl}")
    assert (g1 != g2).all() and len(set(zip(g1.tolist(), g2.tolist(), strict=True))) == 4 * 3
    g1, g2 = _draw("{name: hssl, pairs: {distribution: neighbourhood, max_steps: 1}}",
                   C4_MODEL.replace("order: 4", "order: 8"))
    assert set(((g2 - g1) % 8).tolist()) == {1, 7}
    g1, g2 = _draw("{name: hssl, pairs: {distribution: subset, elements: [0, 1, 3]}}")
    assert set(g1.tolist()) == set(g2.tolist()) == {0, 1, 3} and (g1 != g2).all()


def test_recipe_checks_name_the_keys():
    with pytest.raises(RecipeError, match="model.group is required for model.backbone 'e2_convnet'"):
        parse_recipe("model: {backbone: e2_convnet}", "x.yaml")
    with pytest.raises(RecipeError, match="method.structure 'kept' needs an equivariant model.backbone"):
        parse_recipe("model: {backbone: small_convnet, group: {order: 4}}\nmethod: {name: hssl}", "x.yaml")
    with pytest.raises(RecipeError, match="method.pairs.elements: subset needs at least two"):
        parse_recipe(C4_MODEL + "method: {name: hssl, pairs: {distribution: subset, elements: [0, 9]}}", "x.yaml")


TINY_HSSL = """
name: tiny_hssl
seed: 1
data: {dataset: digits, image_size: 12, random_rotation: true}
model: {backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], projector: [16, 8]}
method: {name: hssl, temperature: 0.2}
optim: {name: adamw, lr: 2.0e-3, warmup_epochs: 1}
train: {epochs: 2, batch_size: 256, checkpoint_every: 1, log_every: 2, diagnostics_every: 0}
"""


def test_pretrain_resumes_bit_exact_and_probe_reads_group_pooled_features(tmp_path):
    whole, first, second = train_stopped_and_resumed(parse_recipe(TINY_HSSL, "tiny_hssl.yaml"), tmp_path,
                                                     stop_step=4)
    assert first.interrupted and first.steps == 4
    expected, resumed = load_file(whole.checkpoint), load_file(second.checkpoint)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert {key.split(".")[0] for key in expected} == {"backbone", "projector", "data"}
    assert load_checkpoint(whole.checkpoint).metadata["backbone"] == "e2_convnet"

    report = probe_checkpoint(whole.checkpoint, device_name="cpu", progress=False)
    assert report["feature_dim"] == 3 and report["method"] == "hssl"
    assert 10 < report["results"]["linear"]["top1"] <= 100
