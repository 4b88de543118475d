import math

import pytest
import torch

from hssl_cli.losses import byol_cosine, info_nce, vicreg


def test_info_nce_matches_hand_computed_value():
    # Views a, b, a, b with a ⟂ b and tau = 1: every row sees its positive at cos 1 and two others at
    # cos 0, so l = -log(e / (e + 2)) = log(1 + 2/e).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert info_nce(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)


def test_info_nce_temperature_sharpens_and_ignores_scale():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # same directions, other lengths: cosine ignores them
    expected = math.log(1 + 2 * math.exp(-1 / 0.5))  # -log(e^{2} / (e^{2} + 2 e^{0}))
    assert info_nce(z1, z2, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_rejects_mismatched_shapes_naming_them():
    with pytest.raises(ValueError, match=r"\(3, 2\) and \(2, 2\)"):
        info_nce(torch.zeros(3, 2), torch.zeros(2, 2), 0.5)


def test_byol_cosine_matches_hand_computed_values():
    assert byol_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])).item() == pytest.approx(2.0)
    assert byol_cosine(torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])).item() == pytest.approx(
        2 - math.sqrt(2), abs=1e-6)
    # mean over the batch: rows with loss 0 and 4
    both = byol_cosine(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert both.item() == pytest.approx(2.0)


def test_vicreg_terms_match_hand_computed_values():
    # z1 centred is [[1,1],[-1,-1]]: Var = 2 per dim (std 1.414 > 1: no variance penalty), covariance
    # off-diagonal 2 -> 2 * 2^2 / d = 4 per view; z2 = z1 + (0.5, 0) -> MSE = (0.25 + 0.25) / 4.
    z1 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    z2 = z1 + torch.tensor([0.5, 0.0])
    terms = vicreg(z1, z2)
    assert terms["loss/invariance"].item() == pytest.approx(0.125)
    assert terms["loss/variance"].item() == pytest.approx(0.0)
    assert terms["loss/covariance"].item() == pytest.approx(8.0)
    assert terms["loss"].item() == pytest.approx(25 * 0.125 + 8.0)


def test_vicreg_variance_hinge_penalises_a_collapsed_dimension():
    # dim 1 is constant: std = sqrt(1e-4) = 0.01, hinge 0.99, averaged over 2 dims, halved per view.
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    terms = vicreg(z, z.clone())
    assert terms["loss/variance"].item() == pytest.approx(0.99 / 2, abs=1e-6)
    assert terms["loss"].item() == pytest.approx(25 * 0.99 / 2, abs=1e-5)
