"""The collapse verdict's rule, in one place and without torch, so `hssl collapse-report --help` can
state it without importing anything heavy.

Calibrated on three known cases (tests/test_collapse_report.py and the issue-11 measurements): an
untrained network, whose raw spectrum is dominated by one common-mode direction (raw effective rank 1.2
for a C8 backbone) although it probes well; a healthy SimCLR run; and BYOL without predictor and target
EMA, which collapses (projector effective rank 1.0 after standardising). Raw covariance spectra cannot
tell the first from the third, so the rank is measured on standardised features, as the linear probe
sees them: each dimension centred and scaled to unit variance (the correlation matrix).
"""

from __future__ import annotations

DEFAULT_THRESHOLD = 1e-3  # a correlation eigenvalue below this fraction of the largest counts as a collapsed dimension
# total variance of the L2-normalised embeddings below this: all within ~0.2 degrees of one direction. An
# untrained network's projector output, dominated by its bias, sits near 1e-3 and still probes well.
COMPLETE_COLLAPSE_VARIANCE = 1e-5
SINGLE_DIRECTION_RANK = 1.5  # effective rank below this: one direction carries (almost) all the variation
DIMENSIONAL_COLLAPSE_FRACTION = 0.05  # effective rank below this share of the available dimensions
DIMENSIONAL_COLLAPSE_FLOOR = 3.0  # ... or below this many dimensions, whichever is larger
VERDICTS = ("healthy", "dimensional collapse", "complete collapse")

VERDICT_RULE = (
    f"the effective rank is that of the standardised features (each dimension centred and scaled to unit "
    f"variance, as the linear probe sees them); complete collapse when it is below {SINGLE_DIRECTION_RANK:g} "
    f"(one direction of variation) or when the L2-normalised embeddings barely differ (total variance "
    f"1 - |mean of z/|z||^2 below {COMPLETE_COLLAPSE_VARIANCE:g}); otherwise dimensional collapse when it is "
    f"below {DIMENSIONAL_COLLAPSE_FRACTION:.0%} of the available dimensions min(D, N-1) (and at least "
    f"{DIMENSIONAL_COLLAPSE_FLOOR:g}); otherwise healthy"
)


def collapse_verdict(effective_rank: float, normalized_total_variance: float, available: int) -> str:
    """VERDICT_RULE applied to one layer's metrics."""
    if effective_rank < SINGLE_DIRECTION_RANK or normalized_total_variance < COMPLETE_COLLAPSE_VARIANCE:
        return "complete collapse"
    if effective_rank < max(DIMENSIONAL_COLLAPSE_FLOOR, DIMENSIONAL_COLLAPSE_FRACTION * available):
        return "dimensional collapse"
    return "healthy"


def verdict_level(verdict: str) -> int:
    """0 healthy, 1 dimensional collapse, 2 complete collapse: a verdict that can be ordered and logged."""
    return VERDICTS.index(verdict)
