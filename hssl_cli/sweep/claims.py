"""A suite's claims, decided by a fixed rule from seed-paired differences; no verdict is written by hand.

For a claim {a, b, metric, test} the cells of variants a and b with the same seed (and swept value) are
paired: d_i = metric(a, seed i) - metric(b, seed i), i = 1..n. Their mean d, sample standard deviation s and
the 95% interval d ± t(0.975, n - 1) s / sqrt(n) (Student's t with n - 1 degrees of freedom) decide:

  test greater (the claim a > b):
    interval above 0                         -> "greater"        (a > b resolved)
    interval below 0                         -> "reversed"       (b > a resolved: the claim is contradicted)
    otherwise                                -> "not resolved"
  test equivalent, margin m (the claim |a - b| < m):
    interval inside (-m, m)                  -> "equivalent"     (two one-sided tests, each at 2.5%)
    interval entirely outside [-m, m]        -> "not equivalent" (|a - b| > m resolved)
    otherwise                                -> "not resolved"

"not resolved" says how many seeds would resolve the observed effect: the least n at which the same mean
and standard deviation would give an interval on one side of 0 (greater), or inside / outside the margin
(equivalent). That is a planning figure, not a promise: at that n a new run resolves about half the time.
Each claim is decided on its own (no correction for a suite's many claims). Imports no torch; the t quantile
is scipy's.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

CONFIDENCE = 0.95
MAX_SEEDS_SHOWN = 1000  # beyond this "would resolve at n seeds" is reported as "more than 1000"


def t_quantile(degrees_of_freedom: int, confidence: float = CONFIDENCE) -> float:
    """t(1 - (1 - confidence) / 2, df): the half-width factor of a two-sided interval."""
    from scipy.stats import t

    return float(t.ppf(1 - (1 - confidence) / 2, degrees_of_freedom))


@dataclass
class Interval:
    mean: float
    std: float
    n: int
    low: float
    high: float


def paired_interval(differences: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std and the t interval of seed-paired differences (needs n >= 2)."""
    n = len(differences)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 paired seeds, got {n}")
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half)


def decide(interval: Interval, test: str, margin: float | None = None) -> str:
    """The verdict word for an interval under the module's rule."""
    if test == "greater":
        if interval.low > 0:
            return "greater"
        if interval.high < 0:
            return "reversed"
        return "not resolved"
    if margin is None or margin <= 0:
        raise ValueError("test equivalent needs a margin > 0")
    if -margin < interval.low and interval.high < margin:
        return "equivalent"
    if interval.low > margin or interval.high < -margin:
        return "not equivalent"
    return "not resolved"


def seeds_to_resolve(mean: float, std: float, test: str, margin: float | None = None,
                     confidence: float = CONFIDENCE) -> int | None:
    """The least n >= 2 at which an interval with this mean and std would give a verdict other than "not
    resolved"; None when no n would (a mean of exactly 0 for greater, a mean exactly at the margin)."""
    # equivalent: from inside the margin reach it, from outside clear it
    distance = abs(mean) if test == "greater" else abs(margin - abs(mean))
    if distance == 0:
        return None
    if std == 0:
        return 2
    for n in range(2, MAX_SEEDS_SHOWN + 1):
        if t_quantile(n - 1, confidence) * std / math.sqrt(n) < distance:
            return n
    return MAX_SEEDS_SHOWN + 1


@dataclass
class ClaimResult:
    """One claim, at one swept value: the paired differences and the verdict."""

    a: str
    b: str
    metric: str
    test: str
    margin: float | None
    value: Any
    label: str
    metric_b: str | None = None  # b's metric when it differs from a's
    seeds: list[int] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)
    interval: Interval | None = None
    verdict: str = "not resolved"
    seeds_needed: int | None = None
    unknown_metric: str | None = None  # a metric no finished cell of a (or b) reports: a misspelt claim
    largest: float = 0.0  # the largest |metric| of the paired cells: its scale, for printing (R² vs accuracy %)

    @property
    def statement(self) -> str:
        """The claim as tested: 'hssl > assl (linear)' or 'hssl ≈ assl within ±1 (linear)'."""
        at = "" if self.value is None else f" at {self.value}"
        if self.metric_b is not None and self.metric_b != self.metric:
            a, b, metric = f"{self.a} {self.metric}", f"{self.b} {self.metric_b}", at.strip()
        else:
            a, b, metric = self.a, self.b, f"{self.metric}{at}"
        shown = f" ({metric})" if metric else ""
        if self.test == "greater":
            return f"{a} > {b}{shown}"
        return f"{a} ≈ {b} within ±{self.margin:g}{shown}"

    @property
    def outcome(self) -> str:
        """The verdict with what a reader needs to weigh it, in one line."""
        n = len(self.differences)
        if self.unknown_metric is not None:
            return f"not decided: no finished cell reports {self.unknown_metric} (a misspelt metric?)"
        if self.interval is None:
            return f"not resolved: {n} paired seed{'s' if n != 1 else ''} (an interval needs 2)"
        if self.verdict != "not resolved":
            return f"{self.verdict} at {n} seeds"
        if self.seeds_needed is None:
            return f"not resolved at {n} seeds (no number of seeds resolves a difference of exactly this size)"
        more = (f"more than {MAX_SEEDS_SHOWN}" if self.seeds_needed > MAX_SEEDS_SHOWN
                else f"about {self.seeds_needed}")
        return f"not resolved at {n} seeds ({more} would resolve the observed effect)"

    def as_dict(self) -> dict:
        interval = self.interval
        return {"a": self.a, "b": self.b, "metric": self.metric, "metric_b": self.metric_b or self.metric,
                "test": self.test, "margin": self.margin,
                "value": self.value, "label": self.label, "statement": self.statement, "seeds": self.seeds,
                "differences": self.differences,
                "mean": interval.mean if interval else None, "std": interval.std if interval else None,
                "interval": [interval.low, interval.high] if interval else None, "confidence": CONFIDENCE,
                "verdict": self.verdict, "seeds_needed": self.seeds_needed, "outcome": self.outcome,
                "unknown_metric": self.unknown_metric}


def evaluate_claim(a: str, b: str, metric: str, test: str, margin: float | None, value: Any, label: str,
                   results: list[dict], metric_b: str | None = None) -> ClaimResult:
    """Pair the finished cells of variants a and b (at swept value `value`) by seed and decide; b is read on
    `metric_b` when given."""
    def finished(variant: str) -> list[dict]:
        return [result for result in results if result.get("variant") == variant and result.get("value") == value
                and result.get("status") == "finished"]

    def by_seed(variant: str, metric: str) -> dict[int, float]:
        numbers = {}
        for result in finished(variant):
            number = result.get("metrics", {}).get(metric)
            if isinstance(number, int | float) and math.isfinite(number):
                numbers[result["seed"]] = float(number)
        return numbers

    def reported(variant: str, metric: str) -> bool | None:
        """Whether a finished cell of the variant has the metric; None when it has no finished cell yet."""
        cells = finished(variant)
        return any(metric in result.get("metrics", {}) for result in cells) if cells else None

    first, second = by_seed(a, metric), by_seed(b, metric_b or metric)
    claim = ClaimResult(a, b, metric, test, margin, value, label, metric_b)
    for variant, name in ((a, metric), (b, metric_b or metric)):
        if reported(variant, name) is False:
            claim.unknown_metric = f"{name} for {variant}"
            return claim
    claim.seeds = sorted(set(first) & set(second))
    claim.differences = [first[seed] - second[seed] for seed in claim.seeds]
    claim.largest = max((abs(number) for seed in claim.seeds for number in (first[seed], second[seed])), default=0.0)
    if len(claim.differences) >= 2:
        claim.interval = paired_interval(claim.differences)
        claim.verdict = decide(claim.interval, test, margin)
        if claim.verdict == "not resolved":
            claim.seeds_needed = seeds_to_resolve(claim.interval.mean, claim.interval.std, test, margin)
    return claim
