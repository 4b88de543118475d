import math

import pytest
import torch

from hssl_cli.losses import (
    barlow_twins,
    byol_cosine,
    dino_cross_entropy,
    info_nce,
    invariant_info_nce,
    iso_loss,
    momentum_contrast,
    vicreg,
)


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


def _cyclic_permutations(order: int) -> torch.Tensor:
    # C_N regular representation: row g maps fibre h to g^-1 h = h - g (mod N)
    return (torch.arange(order)[None, :] - torch.arange(order)[:, None]) % order


def test_invariant_info_nce_is_plain_info_nce_for_the_trivial_group():
    generator = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 1, 5, generator=generator), torch.randn(6, 1, 5, generator=generator)
    trivial = torch.zeros(1, 1, dtype=torch.long)
    expected = info_nce(u.flatten(1), v.flatten(1), temperature=0.3)
    assert invariant_info_nce(u, v, trivial, temperature=0.3).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("soft", [None, 0.1])
def test_invariant_info_nce_is_unchanged_when_one_view_is_transformed(soft):
    generator = torch.Generator().manual_seed(1)
    u, v = torch.randn(5, 4, 3, generator=generator), torch.randn(5, 4, 3, generator=generator)
    permutations = _cyclic_permutations(4)
    before = invariant_info_nce(u, v, permutations, temperature=0.5, soft_temperature=soft)
    for element in range(1, 4):
        rotated = v[:, permutations[element], :]  # rho(g) v for every sample
        after = invariant_info_nce(u, rotated, permutations, temperature=0.5, soft_temperature=soft)
        assert after.item() == pytest.approx(before.item(), abs=1e-5)
    # the plain loss does see the transformation
    assert info_nce(u.flatten(1), v[:, permutations[1], :].flatten(1), 0.5).item() != pytest.approx(
        info_nce(u.flatten(1), v.flatten(1), 0.5).item(), abs=1e-3)


def test_invariant_info_nce_similarity_is_the_best_aligned_cosine():
    # one image per view: u = (e0, e1) fibres, v = u with its fibres swapped; C2 aligns them exactly, so the
    # positive's similarity is 1 and with a single pair the only other column is the row itself (masked).
    u = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = u[:, [1, 0], :]
    loss = invariant_info_nce(u, v, _cyclic_permutations(2), temperature=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # a lone positive: -log(1) = 0


SYMMETRIC_WEIGHT = torch.eye(16) + torch.arange(16.0).outer(torch.arange(16.0)) / 256  # a W_P for iso_loss


@pytest.mark.parametrize("loss", [
    lambda a, b: info_nce(a, b, 0.1), byol_cosine, lambda a, b: vicreg(a, b)["loss"],
    lambda a, b: iso_loss(a, b, SYMMETRIC_WEIGHT), lambda a, b: barlow_twins(a, b)["loss"],
    lambda a, b: momentum_contrast(a, b, 0.2),
    lambda a, b: dino_cross_entropy(a.view(2, 16, 16), b.view(2, 16, 16), torch.zeros(16), 0.1, 0.04),
], ids=["info_nce", "byol_cosine", "vicreg", "iso_loss", "barlow_twins", "momentum_contrast",
        "dino_cross_entropy"])  # fmt: skip
def test_losses_compute_in_float32_under_bf16_autocast(loss):
    """The GPU path runs the model under bf16 autocast; the losses must not inherit its 8-bit mantissa."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    expected = loss(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(a, b)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, rtol=1e-6, atol=1e-6)


def test_barlow_twins_matches_hand_computed_values():
    # standardised per dimension (biased std 1, 2 and 1, 3): Z1 = [[1, 1], [-1, -1]], Z2 = [[1, -1], [-1, 1]]
    z1 = torch.tensor([[1.0, 2.0], [-1.0, -2.0]])
    z2 = torch.tensor([[1.0, -3.0], [-1.0, 3.0]])
    # C = Z1^T Z2 / 2 = [[1, -1], [1, -1]]: invariance (1 - 1)^2 + (1 + 1)^2 = 4, redundancy 1 + 1 = 2
    terms = barlow_twins(z1, z2, redundancy_weight=0.25, eps=0.0)
    assert terms["loss/invariance"].item() == pytest.approx(4.0)
    assert terms["loss/redundancy"].item() == pytest.approx(2.0)
    assert terms["loss"].item() == pytest.approx(4.0 + 0.25 * 2.0)


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # C = I exactly
    assert barlow_twins(z, z, eps=0.0)["loss"].item() == pytest.approx(0.0, abs=1e-7)


def test_momentum_contrast_matches_hand_computed_values():
    queries = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # unit vectors e1, e2 once normalised
    keys = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # e1, e1
    # logits q.k / tau: row 0 [2, 2], row 1 [0, 0] at tau = 0.5; CE log 2 each; scaled by 2 tau = 1
    assert momentum_contrast(queries, keys, 0.5).item() == pytest.approx(math.log(2))
    # tau = 1: rows [1, 1] and [0, 0], CE log 2 each, times 2 tau = 2
    assert momentum_contrast(queries, keys, 1.0).item() == pytest.approx(2 * math.log(2))


def test_momentum_contrast_sends_no_gradient_to_the_keys():
    queries = torch.randn(4, 3, requires_grad=True)
    keys = torch.randn(4, 3, requires_grad=True)
    momentum_contrast(queries, keys, 0.2).backward()
    assert queries.grad is not None and keys.grad is None
