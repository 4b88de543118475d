"""The collapse verdict's rule, in one place and without torch, so `hssl collapse-report --help` can
state it without importing anything heavy."""

from __future__ import annotations

DEFAULT_THRESHOLD = 1e-3  # an eigenvalue below this fraction of the largest counts as a collapsed dimension
# total variance of the L2-normalised embeddings below this: all within ~0.1 rad (6 degrees) of one direction
COMPLETE_COLLAPSE_VARIANCE = 1e-2
DIMENSIONAL_COLLAPSE_FRACTION = 0.25  # this share of the available dimensions collapsed: dimensional collapse
VERDICTS = ("healthy", "dimensional collapse", "complete collapse")

VERDICT_RULE = (
    f"complete collapse when the total variance of the L2-normalised embeddings (1 - |mean of z/|z||^2: near 1 "
    f"for directions spread over the sphere, 0 when all point one way) is below {COMPLETE_COLLAPSE_VARIANCE:g}; "
    f"otherwise dimensional collapse when at least {DIMENSIONAL_COLLAPSE_FRACTION:.0%} of the available "
    f"dimensions (min(D, N-1)) have a covariance eigenvalue below THRESHOLD x the largest; otherwise healthy"
)


def collapse_verdict(normalized_total_variance: float, collapsed: int, available: int) -> str:
    """VERDICT_RULE applied to one layer's metrics."""
    if normalized_total_variance < COMPLETE_COLLAPSE_VARIANCE:
        return "complete collapse"
    if collapsed >= DIMENSIONAL_COLLAPSE_FRACTION * available:
        return "dimensional collapse"
    return "healthy"
