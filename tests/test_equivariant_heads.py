import pytest
import torch

from hssl_cli.data.groups import act_on_images
from hssl_cli.data.views import Views
from hssl_cli.engine.train import pretrain
from hssl_cli.errors import HsslError
from hssl_cli.evaluate.commands.probe import probe_checkpoint
from hssl_cli.methods import build_method
from hssl_cli.recipe import parse_recipe

C4_MODEL = "model: {backbone: e2_convnet, group: {name: C, order: 4}, widths: [2, 3], projector: [16, 8]}\n"


def _method(method: str, model: str = C4_MODEL):
    torch.manual_seed(0)
    return build_method(parse_recipe(model + f"method: {method}\n", "x.yaml"), in_channels=1).eval()


def test_pretext_head_is_exactly_equivariant_for_90_degree_rotations():
    method = _method("{name: equivariant_pretext}")
    images = torch.randn(3, 1, 17, 17, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = method.logits(images)
        for element in range(4):
            rotated = method.logits(act_on_images(images, element, method.group))
            # logits(T_g x)_h = logits(x)_{g^-1 h}
            permutation = method.group.fibre_permutation(torch.full((3,), element))
            assert torch.allclose(rotated, logits.gather(1, permutation), atol=1e-5), element


def test_pretext_loss_is_cross_entropy_against_the_applied_rotation():
    method = _method("{name: equivariant_pretext}").train()
    images = torch.randn(8, 1, 17, 17, generator=torch.Generator().manual_seed(2))
    loss = method(Views([images], []), torch.Generator().manual_seed(5))["loss"]
    elements = torch.randint(4, (8,), generator=torch.Generator().manual_seed(5))  # the draw the method made
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(method.logits(act_on_images(images, elements, method.group)),
                                                     elements)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_flattened_head_reads_every_fibre_and_can_be_non_equivariant():
    """head: flattened is a linear map of the |G| C lifted features: its logits are W vec z(x) by hand, the
    equivariant head is the special case W = I (x) w, and a general W breaks logits(T_g x) = P_g logits(x)."""
    method = _method("{name: equivariant_pretext, head: flattened}")
    images = torch.randn(3, 1, 17, 17, generator=torch.Generator().manual_seed(1))
    lifted = method.backbone.lifted(images)
    assert method.classifier.in_features == 4 * 3 and method.classifier.out_features == 4
    with torch.no_grad():
        logits = method.logits(images)
        assert torch.allclose(logits, lifted.flatten(1) @ method.classifier.weight.T + method.classifier.bias)
        rotated = method.logits(act_on_images(images, 1, method.group))
        permutation = method.group.fibre_permutation(torch.full((3,), 1))
        assert not torch.allclose(rotated, logits.gather(1, permutation), atol=1e-3)
        w = torch.randn(3, generator=torch.Generator().manual_seed(2))
        method.classifier.weight.copy_(torch.block_diag(*[w[None]] * 4))  # W = I (x) w
        method.classifier.bias.zero_()
        equivariant = method.logits(act_on_images(images, 1, method.group))
        assert torch.allclose(equivariant, method.logits(images).gather(1, permutation), atol=1e-5)


def test_structure_removed_runs_rotation_prediction_on_the_plain_twin():
    method = _method("{name: equivariant_pretext, head: flattened, structure: removed}")
    assert not method.backbone.capabilities.equivariant
    assert not any(type(module).__module__.startswith("escnn") for module in method.modules())
    images = torch.randn(8, 1, 17, 17, generator=torch.Generator().manual_seed(2))
    losses = method.train()(Views([images], []), torch.Generator().manual_seed(5))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and all(p.grad is not None for p in method.backbone.parameters())


def test_invariant_contrastive_absorbs_a_group_element_between_the_views():
    method = _method("{name: invariant_contrastive, transform_views: false}")
    images = torch.randn(6, 1, 17, 17, generator=torch.Generator().manual_seed(3))
    other = images + 0.1 * torch.randn(6, 1, 17, 17, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = method(Views([images, other], []), torch.Generator())["loss"]
        after = method(Views([images, act_on_images(other, 1, method.group)], []), torch.Generator())["loss"]
    assert after.item() == pytest.approx(before.item(), abs=1e-4)


def test_methods_on_a_plain_backbone_are_a_user_error():
    with pytest.raises(HsslError, match="needs an equivariant backbone"):
        _method("{name: invariant_contrastive}", model="model: {backbone: small_convnet, projector: [16]}\n")


@pytest.mark.parametrize("method", ["{name: equivariant_pretext, contrastive_weight: 1.0}",
                                    "{name: invariant_contrastive, similarity: logsumexp}"])
def test_trains_and_probes_on_digits(tmp_path, tiny_recipe, method):
    recipe = tiny_recipe(f"method={method}", "model={backbone: e2_convnet, group: {name: C, order: 4}, "
                         "widths: [4, 8], projector: [32, 16]}", "train.epochs=1")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    report = probe_checkpoint(result.checkpoint, device_name="cpu", progress=False)
    assert report["feature_dim"] == 8 and report["results"]["linear"]["top1"] > 30
