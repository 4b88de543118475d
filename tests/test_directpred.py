import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.data.views import Views
from hssl_cli.losses import byol_cosine, iso_loss
from hssl_cli.methods import build_method
from hssl_cli.methods.byol import target_momentum
from hssl_cli.methods.directpred import CorrelationPredictor
from hssl_cli.recipe import load_recipe, parse_recipe
from tests.conftest import train_stopped_and_resumed

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _random_predictor_weight(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A symmetric positive definite W_P with eigenvalues spread over [0.05, 1], like DirectPred's."""
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(0.05, 1.0, dim, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


def test_iso_loss_gradient_wrt_z_equals_byol_gradient_wrt_prediction():
    """For p = W_P z with W_P symmetric:  d L_iso(z, z'; W_P) / dz  ==  d L_byol(p, z') / dp  at p = W_P z,

    where the right side differentiates BYOL's loss 2 - 2 cos(p, z') (batch mean) with p as an independent
    leaf variable. It is NOT BYOL's gradient w.r.t. z, which the chain rule multiplies by W_P:
    d L_byol(W_P z, z') / dz = W_P (d L_byol / dp). Removing that factor is what IsoLoss is for, so the
    test also checks that the chain-ruled gradient differs.
    """
    generator = torch.Generator().manual_seed(0)
    batch, dim = 16, 8
    weight = _random_predictor_weight(dim, generator)
    z = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(batch, dim, generator=generator, dtype=torch.float64)

    iso_loss(z, target, weight).backward()
    prediction = (z.detach() @ weight).requires_grad_(True)
    byol_cosine(prediction, target).backward()
    torch.testing.assert_close(z.grad, prediction.grad, rtol=0, atol=1e-6)

    z_through_predictor = z.detach().clone().requires_grad_(True)
    byol_cosine(z_through_predictor @ weight, target).backward()
    torch.testing.assert_close(z_through_predictor.grad, prediction.grad @ weight, rtol=0, atol=1e-6)
    assert (z_through_predictor.grad - z.grad).abs().max() > 1e-2


def test_iso_loss_matches_hand_computed_value():
    # z = (1, 0), z' = (1, 1), W_P = diag(2, 1): p = (2, 0), |p| = 2, |z'| = sqrt 2, z^T W_P z = 2,
    # sim = 1 / (2 sqrt 2) - 1/2 * 2 / (8 sqrt 2) * 2 = 1 / (4 sqrt 2); L = -2 sim = -1 / (2 sqrt 2).
    loss = iso_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.diag(torch.tensor([2.0, 1.0])))
    assert loss.item() == pytest.approx(-1 / (2 * math.sqrt(2)), abs=1e-6)


def test_iso_loss_rejects_a_predictor_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"must be \(4, 4\), got \(3, 3\)"):
        iso_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.eye(3))


def test_predictor_weight_is_the_normalised_spectrum_of_the_correlation_raised_to_alpha():
    basis, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    correlation = basis @ torch.diag(torch.tensor([4.0, 1.0, 0.0])) @ basis.T
    directpred = CorrelationPredictor(3, alpha=0.5, eps=0.1, rho=0.998)
    directpred.correlation.copy_(correlation)
    # s / max(s) + eps = (1.1, 0.35, 0.1), then ** 0.5, same eigenvectors
    expected = basis @ torch.diag(torch.tensor([1.1, 0.35, 0.1]).sqrt()) @ basis.T
    torch.testing.assert_close(directpred.weight(), expected, rtol=0, atol=1e-5)
    directcopy = CorrelationPredictor(3, alpha=1.0, eps=0.25, rho=0.998)
    directcopy.correlation.copy_(correlation)
    torch.testing.assert_close(directcopy.weight(), correlation / 4 + 0.25 * torch.eye(3), rtol=0, atol=1e-5)
    # an untrained (zero) correlation gives eps^alpha I, not a division by zero
    torch.testing.assert_close(CorrelationPredictor(3, 0.5, 0.1, 0.998).weight(), 0.1**0.5 * torch.eye(3))


def test_eps_outside_is_the_authors_code_convention():
    basis, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    correlation = basis @ torch.diag(torch.tensor([4.0, 1.0, 0.0])) @ basis.T
    outside = CorrelationPredictor(3, alpha=0.5, eps=0.1, rho=0.998, eps_inside=False)
    outside.correlation.copy_(correlation)
    # (s / max(s)) ** 0.5 + eps = (1.1, 0.6, 0.1)
    expected = basis @ torch.diag(torch.tensor([1.1, 0.6, 0.1])) @ basis.T
    torch.testing.assert_close(outside.weight(), expected, rtol=0, atol=1e-3)  # sqrt of a rounded 0


def test_the_predictor_is_refreshed_every_n_steps_and_kept_between():
    predictor = CorrelationPredictor(4, alpha=0.5, eps=0.1, rho=0.5, every=3)
    generator = torch.Generator().manual_seed(0)
    used, fresh = [], []
    for _ in range(7):
        predictor.update(torch.randn(16, 4, generator=generator))
        fresh.append(predictor.weight())
        used.append(predictor.training_weight().clone())
    for step, weight in enumerate(used):  # refreshed at steps 0, 3, 6 from that step's C
        assert torch.equal(weight, fresh[step - step % 3]), step
    assert not torch.equal(used[1], fresh[1]) and int(predictor.calls) == 7
    assert {"correlation", "weight_p", "calls"} <= predictor.state_dict().keys()
    every_step = CorrelationPredictor(4, alpha=0.5, eps=0.1, rho=0.5)
    assert set(every_step.state_dict()) == {"correlation"}  # checkpoints of every-step runs are unchanged


@pytest.mark.parametrize("every", [1, 3])
def test_a_compiled_step_reads_the_predictor_without_recompiling_at_every_call(every):
    """`train.compile` (the GPU recipes' `auto`): the Python call count that decides a refresh must not become a
    guard of the compiled step, which then recompiled at every call (found with TORCH_LOGS=recompiles)."""
    import torch._dynamo

    class Step(torch.nn.Module):  # what DirectPred.forward does with the predictor, in small
        def __init__(self):
            super().__init__()
            self.predictor = CorrelationPredictor(4, alpha=0.5, eps=0.1, rho=0.5, every=every)

        def forward(self, z):
            self.predictor.update(z)
            return z @ self.predictor.training_weight()

    torch._dynamo.reset()
    eager, compiled = Step(), torch.compile(Step())
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 4, generator=generator) for _ in range(6)]
    compiled(batches[0]), eager(batches[0])  # the first call compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for z in batches[1:]:
            torch.testing.assert_close(compiled(z), eager(z), rtol=1e-5, atol=1e-6)
    assert int(compiled.predictor.calls) == 6


def test_correlation_is_an_ema_of_the_uncentred_batch_correlation():
    predictor = CorrelationPredictor(2, alpha=0.5, eps=0.1, rho=0.9)
    first, second = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    predictor.update(first)  # z^T z / B = [[1, 0], [0, 0]]
    predictor.update(second)  # z^T z / B = [[0, 0], [0, 2]]; uncentred: the mean is not removed
    expected = 0.9 * 0.1 * torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + 0.1 * torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(predictor.correlation, expected)


@pytest.mark.parametrize("loss", ["byol", "iso"])
def test_directpred_updates_the_correlation_only_in_training_and_learns_no_predictor(tiny_recipe, loss):
    torch.manual_seed(0)
    method = build_method(tiny_recipe(f"method={{name: directpred, loss: {loss}}}"), in_channels=1)
    assert list(method.predictor.parameters()) == []
    views = Views([torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)], [])
    method.eval()
    method(views, torch.Generator())
    assert torch.count_nonzero(method.predictor.correlation) == 0
    method.train()
    losses = method(views, torch.Generator())
    assert torch.count_nonzero(method.predictor.correlation) > 0
    losses["loss"].backward()
    assert method.backbone.features[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.target.parameters())
    assert ("loss/cosine" in losses) == (loss == "iso")


def test_without_ema_there_is_no_target_network(tiny_recipe):
    method = build_method(tiny_recipe("method={name: directpred, ema: false}"), in_channels=1)
    assert method.target is None and not any(key.startswith("target.") for key in method.state_dict())
    method.after_optimizer_step(0.5)  # nothing to update, and no error


def test_directcopy_is_directpred_with_alpha_one_and_eps_quarter(tiny_recipe):
    config = tiny_recipe("method={name: directcopy}").method
    assert (config.alpha, config.eps, config.rho) == (1.0, 0.25, 0.998)
    assert tiny_recipe("method={name: directcopy, alpha: 0.7}").method.alpha == 0.7
    predictor = build_method(tiny_recipe("method={name: directcopy}"), in_channels=1).predictor
    assert (predictor.alpha, predictor.eps) == (1.0, 0.25)


def test_target_momentum_rises_from_tau0_to_one_by_a_cosine():
    assert target_momentum(0.0, 0.99) == pytest.approx(0.99)
    assert target_momentum(0.5, 0.99) == pytest.approx(0.995)
    assert target_momentum(1.0, 0.99) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["{name: directpred, loss: iso}", "{name: directcopy, ema: false}",
                                    "{name: directpred, predictor_every: 3}"])
def test_directpred_resume_after_stop_continues_bit_exact(tmp_path, tiny_recipe, method):
    whole, first, second = train_stopped_and_resumed(tiny_recipe(f"method={method}", "train.epochs=1"), tmp_path,
                                                     stop_step=4)
    assert first.interrupted and first.steps < whole.steps
    expected, resumed = load_file(whole.checkpoint), load_file(second.checkpoint)
    assert "predictor.correlation" in expected and expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


@pytest.mark.parametrize("path", sorted([*RECIPES.glob("directpred*.yaml"), *RECIPES.glob("isoloss*.yaml"),
                                         *RECIPES.glob("byol_*cpu*.yaml")]), ids=lambda path: path.stem)
def test_directpred_and_isoloss_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.method.name in {"directpred", "directcopy", "byol"}
    if path.stem.startswith("isoloss"):
        assert recipe.method.loss == "iso"


def test_cifar10_recipes_follow_the_paper_settings():
    for stem, loss in (("directpred_cifar10", "byol"), ("isoloss_cifar10", "iso")):
        recipe = load_recipe(RECIPES / f"{stem}.yaml")
        assert recipe.model.backbone == "resnet18_cifar" and recipe.model.projector == [4096, 256]
        assert (recipe.optim.name, recipe.optim.lr, recipe.optim.weight_decay) == ("lars", 1.0, 1e-4)
        assert recipe.train.batch_size == 256 and recipe.method.ema_start == 0.99
        assert (recipe.method.alpha, recipe.method.rho, recipe.method.loss) == (0.5, 0.998, loss)


def test_unknown_directpred_key_is_named_with_a_suggestion():
    with pytest.raises(Exception, match=r"unknown key 'method.aplha'; did you mean 'method.alpha'\?"):
        parse_recipe("method: {name: directpred, aplha: 1}", "r.yaml")
