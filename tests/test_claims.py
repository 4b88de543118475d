"""Claims are decided by a fixed rule from seed-paired differences: the interval and the verdicts against
values computed by hand (t quantiles from a printed table)."""

import math

import pytest

from hssl_cli.sweep.claims import decide, evaluate_claim, paired_interval, seeds_to_resolve, t_quantile


def test_t_quantiles_match_the_printed_table():
    # two-sided 95%: t(0.975, df) for df = 1, 2, 4, 9 from any statistics table
    assert [round(t_quantile(df), 3) for df in (1, 2, 4, 9)] == [12.706, 4.303, 2.776, 2.262]


def test_paired_interval_matches_hand_computed_values():
    # d = 1, 2, 3: mean 2, sample std 1, half-width 4.3027 / sqrt(3) = 2.4841
    interval = paired_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.std, interval.n) == (2.0, 1.0, 3)
    assert interval.low == pytest.approx(2 - 2.48414, abs=1e-4) and interval.high == pytest.approx(4.48414, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([1.0])


def test_greater_is_resolved_only_when_the_interval_excludes_zero():
    assert decide(paired_interval([1.0, 2.0, 3.0]), "greater") == "not resolved"  # [-0.48, 4.48]
    assert decide(paired_interval([2.0, 2.5, 3.0]), "greater") == "greater"  # 2.5 ± 1.242
    assert decide(paired_interval([-2.0, -2.5, -3.0]), "greater") == "reversed"


def test_equivalence_needs_the_interval_inside_the_margin():
    # d = 0.1, -0.2, 0.3, 0, -0.1: mean 0.02, std sqrt(0.148 / 4) = 0.19235, half 2.7764 * 0.19235 / sqrt(5) = 0.2388
    differences = [0.1, -0.2, 0.3, 0.0, -0.1]
    interval = paired_interval(differences)
    assert interval.std == pytest.approx(math.sqrt(0.037)) and interval.high == pytest.approx(0.02 + 0.23883, abs=1e-4)
    assert decide(interval, "equivalent", 1.0) == "equivalent"
    assert decide(interval, "equivalent", 0.25) == "not resolved"  # the upper end 0.259 passes 0.25
    assert decide(paired_interval([3.0, 3.5, 4.0]), "equivalent", 1.0) == "not equivalent"  # [2.26, 4.74]
    # a difference that is resolved but small is still equivalent: the rule is about the margin
    assert decide(paired_interval([0.3, 0.31, 0.32, 0.29]), "equivalent", 1.0) == "equivalent"


def test_seeds_to_resolve_the_observed_effect():
    # mean 2, std 1: n = 3 gives a half-width 2.484 > 2, n = 4 gives t(3) / 2 = 3.182 / 2 = 1.591 < 2
    assert seeds_to_resolve(2.0, 1.0, "greater") == 4
    # equivalence with |mean| 0.02 inside m = 0.25: the half-width must drop below 0.23
    n = seeds_to_resolve(0.02, math.sqrt(0.037), "equivalent", 0.25)
    assert t_quantile(n - 1) * math.sqrt(0.037) / math.sqrt(n) < 0.23
    assert t_quantile(n - 2) * math.sqrt(0.037) / math.sqrt(n - 1) >= 0.23
    assert seeds_to_resolve(0.0, 1.0, "greater") is None
    # no spread: any nonzero distance resolves at 2 seeds; a mean exactly on 0 or on the margin never does
    assert seeds_to_resolve(0.5, 0.0, "greater") == 2
    assert seeds_to_resolve(0.0, 0.0, "greater") is None and seeds_to_resolve(1.0, 0.0, "equivalent", 1.0) is None


def _result(variant, seed, linear, value=None, status="finished"):
    return {"variant": variant, "seed": seed, "value": value, "status": status, "metrics": {"linear": linear}}


def test_cells_are_paired_by_seed_and_unpaired_or_diverged_seeds_are_left_out():
    results = [_result("a", 0, 50.0), _result("a", 1, 52.0), _result("a", 2, 51.0), _result("a", 3, 49.0),
               _result("b", 0, 48.0), _result("b", 1, 51.0), _result("b", 2, 48.5),
               _result("b", 3, 0.0, status="diverged")]
    claim = evaluate_claim("a", "b", "linear", "greater", None, None, "a > b", results)
    assert claim.seeds == [0, 1, 2] and claim.differences == [2.0, 1.0, 2.5]
    assert claim.interval.mean == pytest.approx(11 / 6) and claim.verdict == "not resolved"
    assert claim.outcome.startswith("not resolved at 3 seeds (about ")
    lone = evaluate_claim("a", "b", "linear", "greater", None, None, "a > b", results[:1] + results[4:5])
    assert lone.interval is None and "an interval needs 2" in lone.outcome


def test_a_swept_claim_pairs_only_cells_at_its_value():
    results = [_result("a", s, 50 + s, value=0.1) for s in range(3)] + \
              [_result("b", s, 40 + s, value=0.1) for s in range(3)] + \
              [_result("b", s, 60 + s, value=1.0) for s in range(3)]
    claim = evaluate_claim("a", "b", "linear", "greater", None, 0.1, "", results)
    assert claim.differences == [10.0, 10.0, 10.0] and claim.verdict == "greater"
    assert claim.statement == "a > b (linear at 0.1)"


def test_a_claim_may_read_b_on_another_metric():
    results = [{"variant": "a", "seed": s, "value": None, "status": "finished", "metrics": {"knn": 90.0 + s}}
               for s in range(3)]
    results += [{"variant": "b", "seed": s, "value": None, "status": "finished",
                 "metrics": {"knn": 0.0, "knn_exact": 80.0 + 2 * s}} for s in range(3)]
    claim = evaluate_claim("a", "b", "knn", "greater", None, None, "", results, metric_b="knn_exact")
    assert claim.differences == [10.0, 9.0, 8.0] and claim.verdict == "greater"
    assert claim.statement == "a knn > b knn_exact"


def test_a_metric_no_finished_cell_reports_is_named_not_read_as_missing_seeds():
    results = [_result("a", s, 50.0 + s) for s in range(3)] + [_result("b", s, 40.0) for s in range(3)]
    claim = evaluate_claim("a", "b", "lienar", "greater", None, None, "", results)
    assert claim.interval is None and claim.outcome == (
        "not decided: no finished cell reports lienar for a (a misspelt metric?)")
    pending = evaluate_claim("a", "c", "linear", "greater", None, None, "", results)  # c has no finished cell yet
    assert pending.unknown_metric is None and "an interval needs 2" in pending.outcome


def test_the_report_prints_a_zero_to_one_metric_with_a_third_decimal():
    from types import SimpleNamespace

    from hssl_cli.sweep.report import claim_rows

    r2 = [{"variant": v, "seed": s, "value": None, "status": "finished", "metrics": {"r2": r}}
          for v, s, r in (("a", 0, 0.512), ("a", 1, 0.498), ("a", 2, 0.505), ("b", 0, 0.4), ("b", 1, 0.41),
                          ("b", 2, 0.395))]
    accuracy = [_result("a", s, 50.0 + s) for s in range(3)] + [_result("b", s, 40.0) for s in range(3)]
    claims = [evaluate_claim("a", "b", "r2", "greater", None, None, "", r2),
              evaluate_claim("a", "b", "linear", "greater", None, None, "", accuracy)]
    (_, _, r2_seeds, r2_summary, _), (_, _, seeds, _, _) = claim_rows(SimpleNamespace(claims=claims))[1]
    assert r2_seeds == "+0.112, +0.088, +0.110" and r2_summary.startswith("+0.103 [")
    assert seeds == "+10.00, +11.00, +12.00"
