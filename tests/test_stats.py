"""Wilson intervals and exact McNemar p-values against values computed by hand."""

from __future__ import annotations

import math

import pytest

from abliterate.stats import compare_paired, mcnemar_exact, rate_record, wilson_interval


def _wilson_by_formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 10), (7, 144), (72, 144), (1, 1)])
def test_wilson_matches_the_closed_form(k, n):
    low, high = wilson_interval(k, n)
    expected_low, expected_high = _wilson_by_formula(k, n)
    assert low == pytest.approx(max(0.0, expected_low), abs=1e-9)
    assert high == pytest.approx(min(1.0, expected_high), abs=1e-9)


def test_wilson_known_values():
    # 0 of 10: [0, 0.2775]; 5 of 10: [0.2366, 0.7634] (standard tables)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx([0.23659, 0.76341], abs=1e-4)


def test_nothing_measured_has_no_rate():
    assert wilson_interval(0, 0) is None
    assert rate_record("refusal_rate", 0, 0) == {"refusal_rate": None, "refusal_rate_ci95": None}
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_mcnemar_exact_known_values():
    # b=0, c=5: p = 2 * 0.5**5 = 0.0625; b=1, c=9: 2 * (1 + 10) / 1024 = 0.021484375
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(3, 3) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0


def test_compare_paired_counts_the_discordant_prompts():
    first = [True, True, True, False, False, True]
    second = [True, False, False, False, True, True]
    result = compare_paired(first, second)
    assert (result.n, result.first, result.second) == (6, 4, 3)
    assert (result.only_first, result.only_second) == (2, 1)
    assert result.difference == pytest.approx(1 / 6)
    assert result.p_value == pytest.approx(1.0)  # 2 vs 1 discordant: no evidence
    with pytest.raises(ValueError):
        compare_paired([True], [True, False])
