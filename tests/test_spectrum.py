import math

import pytest
import torch
from torch import nn

from hssl_cli.evaluate.commands.collapse_report import plot_spectra
from hssl_cli.evaluate.measures.collapse_verdict import collapse_verdict
from hssl_cli.evaluate.measures.spectrum import (
    covariance_eigenvalues,
    effective_rank,
    layer_outputs,
    layer_spectrum,
    participation_ratio,
    predictor_alignment,
    rankme,
    training_diagnostics,
)
from hssl_cli.methods.base import SSLMethod
from hssl_cli.models.capabilities import BackboneCapabilities

SAMPLES, DIM = 1024, 32


def embeddings_of_rank(rank: int, samples: int = SAMPLES, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """Centred (N, D) embeddings whose covariance is exactly diag(1, ..., 1, 0, ..., 0) with `rank` ones:
    orthonormal coordinates in the first `rank` dimensions, the other dimensions constant (zero)."""
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.randn(samples, rank, generator=generator, dtype=torch.float64)
    coordinates, _ = torch.linalg.qr(coordinates - coordinates.mean(dim=0))  # orthonormal, still centred
    embeddings = torch.zeros(samples, dim, dtype=torch.float64)
    embeddings[:, :rank] = (samples - 1) ** 0.5 * coordinates
    return embeddings


@pytest.mark.parametrize(("rank", "verdict"), [(1, "complete collapse"), (DIM // 2, "healthy"), (DIM, "healthy")])
def test_synthetic_embeddings_of_known_rank_give_their_rank_and_verdict(rank, verdict):
    spectrum = layer_spectrum(embeddings_of_rank(rank))
    assert spectrum["effective_rank"] == pytest.approx(rank, rel=1e-6)
    assert spectrum["effective_rank_raw"] == pytest.approx(rank, rel=1e-6)
    assert spectrum["participation_ratio"] == pytest.approx(rank, rel=1e-6)
    assert spectrum["rankme"] == pytest.approx(rank, rel=1e-3)  # centred data: uncentred = centred spectrum
    assert spectrum["collapsed_dims"] == DIM - rank and spectrum["available_dims"] == DIM
    assert spectrum["eigenvalues"][:rank] == pytest.approx([1.0] * rank)
    assert spectrum["verdict"] == verdict


def test_few_dimensions_of_many_is_dimensional_collapse():
    assert layer_spectrum(embeddings_of_rank(2, dim=64))["verdict"] == "dimensional collapse"  # below 3
    assert layer_spectrum(embeddings_of_rank(4, dim=64))["verdict"] == "healthy"  # 4 >= 5% of 64
    assert layer_spectrum(embeddings_of_rank(12, dim=256))["verdict"] == "dimensional collapse"  # 12 < 5% of 256


def test_a_common_mode_direction_dominates_the_raw_spectrum_but_not_the_standardised_one():
    """An untrained ReLU network's features: every dimension = a shared magnitude x its own scale, plus
    independent structure of one size; the raw covariance sees one direction, a probe sees more."""
    generator = torch.Generator().manual_seed(0)
    magnitude = 1 + 0.3 * torch.randn(SAMPLES, 1, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-1, 2, DIM, dtype=torch.float64)
    features = scales * magnitude + 0.3 * torch.randn(SAMPLES, DIM, generator=generator, dtype=torch.float64)
    spectrum = layer_spectrum(features)
    assert spectrum["effective_rank_raw"] < 1.05 and spectrum["effective_rank"] > 4
    assert spectrum["verdict"] == "healthy"


def test_embeddings_clustered_around_one_vector_are_complete_collapse_though_their_noise_is_full_rank():
    generator = torch.Generator().manual_seed(0)
    collapsed = torch.ones(SAMPLES, DIM) + 1e-3 * torch.randn(SAMPLES, DIM, generator=generator)
    spectrum = layer_spectrum(collapsed)
    # The isotropic noise has a full-rank covariance; only the spread of directions reveals the collapse.
    assert spectrum["effective_rank"] > 0.9 * DIM and spectrum["collapsed_dims"] == 0
    assert spectrum["rankme"] < 1.1  # uncentred: one dominant singular value
    assert spectrum["normalized_std"] < 0.01 * spectrum["healthy_std"]
    assert spectrum["verdict"] == "complete collapse"


def test_isotropic_gaussian_has_the_healthy_normalised_std():
    spectrum = layer_spectrum(torch.randn(8192, DIM, generator=torch.Generator().manual_seed(0)))
    assert spectrum["normalized_std"] == pytest.approx(DIM**-0.5, rel=0.02)
    assert spectrum["normalized_variance"] == pytest.approx(1.0, abs=0.01)
    assert spectrum["effective_rank"] > 0.97 * DIM and spectrum["verdict"] == "healthy"


def test_effective_rank_and_participation_ratio_match_hand_computed_values():
    eigenvalues = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(eigenvalues) == pytest.approx(math.exp(entropy))
    assert participation_ratio(eigenvalues) == pytest.approx(16 / 10)
    assert effective_rank(torch.zeros(4)) == 0.0 and participation_ratio(torch.zeros(4)) == 0.0


def test_rankme_of_a_diagonal_matrix_uses_its_singular_values():
    # singular values (2, 2, 0): p = (1/2, 1/2, 0) -> exp(log 2) = 2
    assert rankme(torch.diag(torch.tensor([2.0, 2.0, 0.0]))) == pytest.approx(2.0, rel=1e-5)


def test_fewer_samples_than_dimensions_leave_only_n_minus_one_eigenvalues():
    eigenvalues = covariance_eigenvalues(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))
    assert eigenvalues.numel() == 9 and bool((eigenvalues[:-1] >= eigenvalues[1:]).all())
    assert layer_spectrum(torch.randn(10, 64))["available_dims"] == 9


def test_verdict_rule_checks_complete_collapse_before_dimensional_collapse():
    assert collapse_verdict(1.2, normalized_total_variance=0.5, available=32) == "complete collapse"
    assert collapse_verdict(20.0, normalized_total_variance=1e-6, available=32) == "complete collapse"
    assert collapse_verdict(5.0, normalized_total_variance=0.5, available=256) == "dimensional collapse"
    assert collapse_verdict(1.8, normalized_total_variance=0.5, available=16) == "dimensional collapse"
    assert collapse_verdict(13.0, normalized_total_variance=0.5, available=256) == "healthy"
    assert collapse_verdict(3.3, normalized_total_variance=2.5e-3, available=32) == "healthy"


def test_predictor_sharing_the_correlation_eigenvectors_is_aligned_and_a_rotation_is_not():
    z = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = z * torch.linspace(0.5, 3.0, 8, dtype=torch.float64) + 1.0  # distinct eigenvalues, a mean
    strengths, directions = torch.linalg.eigh(z.T @ z / len(z))
    aligned = directions @ torch.diag(strengths.sqrt()) @ directions.T
    result = predictor_alignment(z, z @ aligned)
    assert result["alignment"] == pytest.approx(1.0, abs=1e-9) and result["linear_fit_r2"] == pytest.approx(1.0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert predictor_alignment(z, z @ rotation)["alignment"] < 0.7


class _TinyMethod(SSLMethod):
    def __init__(self):
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
        backbone.capabilities = BackboneCapabilities()  # pooled features only: no lifted fibres to measure
        super().__init__(backbone)
        self.projector = nn.Linear(6, 4)
        self.predictor = nn.Linear(4, 4)


def test_training_diagnostics_measure_every_layer_and_the_predictor():
    torch.manual_seed(0)
    metrics = training_diagnostics(_TinyMethod().eval(), torch.randn(64, 3, 2, 2))
    for layer in ("backbone", "projector", "predictor"):
        assert 1 <= metrics[f"{layer}/effective_rank"] <= 6
        assert metrics[f"{layer}/collapse_level"] in (0.0, 1.0, 2.0)
    assert 0 < metrics["predictor/alignment"] <= 1 and metrics["predictor/linear_fit_r2"] == pytest.approx(1.0)
    assert all(isinstance(value, float) for value in metrics.values())


def test_layer_outputs_are_the_methods_collapse_layers_flattened():
    outputs = layer_outputs(_TinyMethod().eval(), torch.randn(8, 3, 2, 2))
    assert {name: tuple(output.shape) for name, output in outputs.items()} == {
        "backbone": (8, 6), "projector": (8, 4), "predictor": (8, 4)}


def test_plot_overlays_reports_per_layer_in_the_format_of_the_suffix(tmp_path):
    def report(ranks, epoch):
        layers = {f"layer{i}": layer_spectrum(embeddings_of_rank(rank)) for i, rank in enumerate(ranks)}
        return {"layers": layers, "threshold": 1e-3, "dataset": "imagefolder", "data_root": "/data/cifar10-jpeg",
                "samples": 100, "split": "test", "method": "simclr", "loss": None, "backbone": "small_convnet",
                "epoch": epoch}

    reports = [report((1, DIM), 0), report((DIM, DIM), 10)]
    for suffix, magic in ((".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = tmp_path / "sub" / f"spectrum{suffix}"
        plot_spectra(reports, path, shared_axes=suffix != ".svg")
        assert path.read_bytes().startswith(magic) and path.stat().st_size > 5_000
    svg = (tmp_path / "sub" / "spectrum.svg").read_text()
    assert "cifar10-jpeg" in svg and "imagefolder" not in svg and "epoch 10" in svg
