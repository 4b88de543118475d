"""BYOL without its EMA target (`method.ema: false`) is SimSiam (Chen & He 2021): the prediction of each view
is pulled to the other view's online embedding under stop-gradient."""

import pytest
import torch
import torch.nn.functional as F

from hssl_cli.data.views import Views
from hssl_cli.methods import build_method


def test_byol_without_ema_equals_simsiams_loss_and_gradients(tiny_recipe):
    torch.manual_seed(0)
    model = build_method(tiny_recipe("method={name: byol, predictor: [64, 32], ema: false}"), in_channels=1).train()
    assert model.target is None and not any(name.startswith("target.") for name in model.state_dict())
    draw = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(16, 1, 16, 16, generator=draw), torch.randn(16, 1, 16, 16, generator=draw)
    loss = model(Views([x1, x2], []), torch.Generator())["loss"]
    loss.backward()
    ours = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    # SimSiam, Algorithm 1: z = g(f(x)), p = h(z); L = D(p1, sg z2) / 2 + D(p2, sg z1) / 2 with D = -cos
    z1, z2 = model.projector(model.backbone(torch.cat([x1, x2]))).chunk(2)
    p1, p2 = model.predictor(torch.cat([z1, z2])).chunk(2)
    simsiam = (-F.cosine_similarity(p1, z2.detach()).mean() - F.cosine_similarity(p2, z1.detach()).mean()) / 2
    simsiam.backward()
    # BYOL's (2 - 2 cos) summed over the two directions is 4 + 4 x SimSiam's loss: the same gradients x 4
    assert loss.item() == pytest.approx(4 + 4 * simsiam.item(), abs=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.allclose(ours[name], 4 * parameter.grad, atol=1e-6, rtol=1e-4), name
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.after_optimizer_step(0.5)  # no target to move
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_byol_with_ema_keeps_its_target(tiny_recipe):
    torch.manual_seed(0)
    model = build_method(tiny_recipe("method={name: byol, predictor: [64, 32]}"), in_channels=1)
    assert model.target is not None and any(name.startswith("target.") for name in model.state_dict())
