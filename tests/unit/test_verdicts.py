"""The verdict rules, fed synthetic numbers for each outcome."""

import pytest

from refusal_atlas.evaluation.stats import rate_record
from refusal_atlas.evaluation.verdicts import lower_is_better, separated, within_tolerance


def test_rates_with_separated_intervals_support_or_refute():
    dim, som = rate_record(6, 100), rate_record(19, 100)  # the measured SOM-vs-DIM numbers of issue 3
    assert lower_is_better(dim, som).verdict == "supported"
    assert lower_is_better(som, dim).verdict == "not supported"


def test_overlapping_intervals_are_inconclusive_in_both_directions():
    a, b = rate_record(6, 100), rate_record(9, 100)
    assert lower_is_better(a, b).verdict == "inconclusive"
    assert lower_is_better(b, a).verdict == "inconclusive"
    assert "overlapping" in lower_is_better(a, b).rule


def test_small_samples_cannot_support_a_claim_large_ones_can():
    assert lower_is_better(rate_record(1, 10), rate_record(4, 10)).verdict == "inconclusive"
    assert lower_is_better(rate_record(100, 1000), rate_record(400, 1000)).verdict == "supported"


def test_tolerance_rule():
    assert within_tolerance(2.6e-8, 1e-6).verdict == "supported"
    assert within_tolerance(1e-3, 1e-6).verdict == "not supported"
    assert within_tolerance(float("nan"), 1e-6).verdict == "inconclusive"


def test_separation_rule():
    assert separated([-5.0, -4.2, -3.0], [-1.0, -0.8]).verdict == "supported"
    assert separated([-1.0, -0.5], [-5.0, -4.0]).verdict == "not supported"
    assert separated([-5.0, -0.9], [-1.0, -0.8]).verdict == "inconclusive"  # overlap, medians in order
    assert separated([], [-1.0]).verdict == "inconclusive"


def test_unordered_interval_is_rejected():
    with pytest.raises(ValueError):
        lower_is_better({"rate": 0.1, "ci95": [0.2, 0.1]}, rate_record(1, 10))


def test_correlation_rule_every_outcome():
    from refusal_atlas.evaluation.verdicts import positively_correlated

    x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert positively_correlated(x, [2 * v + 0.1 * (-1) ** i for i, v in enumerate(x)]).verdict == "supported"
    assert positively_correlated(x, [-v for v in x]).verdict == "not supported"
    assert positively_correlated(x, [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.5, -0.5]).verdict == "inconclusive"
    assert positively_correlated([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]).verdict == "inconclusive"  # n < 4: no interval
    assert positively_correlated(x, [1.0] * 8).verdict == "inconclusive"  # constant: r undefined


def test_all_of_rule_every_outcome():
    from refusal_atlas.evaluation.verdicts import ClaimVerdict, all_of

    s, n, i = (ClaimVerdict(v, "r", v) for v in ("supported", "not supported", "inconclusive"))
    assert all_of([s, s]).verdict == "supported"
    assert all_of([s, n, i]).verdict == "not supported"
    assert all_of([s, i]).verdict == "inconclusive"
    assert all_of([]).verdict == "inconclusive"
