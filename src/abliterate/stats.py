"""Counts with their uncertainty: Wilson intervals and exact McNemar tests (scipy).

A trial evaluates 10 to a few hundred prompts, so every rate is reported as a count out of n with
a Wilson 95% interval (at n = 10 it spans about +-0.3), and two trials on the same prompts are
compared prompt by prompt: the exact McNemar test looks only at the discordant prompts (refused
by one, not by the other), whose split is Binomial(b + c, 1/2) when the two do not differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import binomtest

CONFIDENCE = 0.95


def wilson_interval(count: int, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """The Wilson score interval ``[low, high]`` of ``count`` successes out of ``n``; None if
    n = 0 (nothing was measured, so there is no rate to bound)."""
    if n == 0:
        return None
    if not 0 <= count <= n:
        raise ValueError(f"count {count} is not between 0 and n={n}")
    interval = binomtest(count, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(interval.low), float(interval.high)]


def rate_record(name: str, count: int, n: int) -> dict[str, object]:
    """``{name: rate, <name>_ci95: [low, high]}`` with the rate None when n = 0."""
    return {
        name: count / n if n else None,
        f"{name}_ci95": wilson_interval(count, n),
    }


@dataclass(frozen=True)
class PairedComparison:
    """Two trials' binary outcomes on the same prompts.

    Attributes:
        n: prompts compared.
        first, second: prompts with the outcome in each trial.
        only_first, only_second: the discordant prompts (b and c of McNemar's table).
        p_value: exact two-sided McNemar p-value (1.0 when there is no discordant prompt).
    """

    n: int
    first: int
    second: int
    only_first: int
    only_second: int
    p_value: float

    @property
    def difference(self) -> float:
        """first rate - second rate."""
        return (self.first - self.second) / self.n if self.n else float("nan")


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value from the two discordant counts."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(binomtest(only_first, discordant, 0.5, alternative="two-sided").pvalue)


def compare_paired(first: Sequence[bool], second: Sequence[bool]) -> PairedComparison:
    """McNemar comparison of two outcome vectors over the same prompts, in the same order."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need the same prompts: {len(first)} vs {len(second)}")
    only_first = sum(a and not b for a, b in zip(first, second, strict=True))
    only_second = sum(b and not a for a, b in zip(first, second, strict=True))
    return PairedComparison(
        n=len(first),
        first=sum(map(bool, first)),
        second=sum(map(bool, second)),
        only_first=only_first,
        only_second=only_second,
        p_value=mcnemar_exact(only_first, only_second),
    )


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over all of ``p_values``)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
