"""Geometry that explains why a contrast baseline works or fails (method.md, Geometry).

Per layer and harm category c, with G the generic harmless mean:
    u_c = mean(harmful_c) - G                    (unmatched contrast)
    m_c = mean(harmful_c) - mean(matched_c)      (matched contrast)
    t_c = mean(matched_c) - G                    (the topic component), so u_c = m_c + t_c.
Petrov's finding is |m_c| / |u_c| ~ 0.1: subtracting a same-topic mean cancels the topic part
and leaves a much smaller direction.

Null baselines (method.md, Statistics): with a few dozen prompts per category these quantities
carry sampling noise of the order of a small matched difference, so ``split_half_reliability``
says how much of m_c and u_c two disjoint halves of the data agree on, and
``shuffled_category_null`` gives the same statistics when each category's harmful prompts are
contrasted with another category's matched set. ``compute_behavioural_capture`` measures capture
on held-out pairs chosen by what the unedited model did (refused harmful vs answered matched).

Every function takes plain activations at one layer, reduces in float64 and returns Python
floats. A quantity that is undefined (a zero-norm vector, an empty set) is NaN with a
RuntimeWarning, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Axes of a direction stack whose singular value is below s_max * max(k, d) * eps_float32 are
# treated as absent: the directions are float32, so smaller components are rounding noise.
_RANK_EPS = torch.finfo(torch.float32).eps


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _mean64(activations: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (d,) float64 mean; a 1-D input is taken as an already computed mean."""
    if activations.ndim == 1:
        return activations.double()
    if activations.ndim != 2:
        raise ValueError(f"expected (n, d_model) or (d_model,), got {tuple(activations.shape)}")
    if activations.shape[0] == 0:
        return torch.full((activations.shape[1],), math.nan, dtype=torch.float64)
    return activations.double().mean(dim=0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) in float64; NaN when either vector is zero or non-finite."""
    a, b = a.double(), b.double()
    norm_a, norm_b = a.norm().item(), b.norm().item()
    if not (norm_a > 0 and norm_b > 0 and math.isfinite(norm_a) and math.isfinite(norm_b)):
        return math.nan
    return float(a @ b) / (norm_a * norm_b)


def _ratio(numerator: float, denominator: float) -> float:
    if not (denominator > 0 and math.isfinite(denominator) and math.isfinite(numerator)):
        return math.nan
    return numerator / denominator


def _rows_by_category(categories: Sequence[str]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for index, category in enumerate(categories):
        rows.setdefault(category, []).append(index)
    return rows


def _check_rows(name: str, activations: torch.Tensor, categories: Sequence[str]) -> None:
    if activations.ndim != 2 or activations.shape[0] != len(categories):
        raise ValueError(
            f"{name} must be (n, d_model) with one category per row; got shape "
            f"{tuple(activations.shape)} and {len(categories)} categories"
        )


def _finite_mean(values: list[float], name: str, labels: list[str]) -> float:
    """Mean over categories of the finite values; the others are named in a warning."""
    finite = [v for v in values if math.isfinite(v)]
    excluded = [label for label, v in zip(labels, values, strict=True) if not math.isfinite(v)]
    if excluded:
        _warn(f"{name} is undefined for categories {excluded}; left out of the mean")
    if not finite:
        if labels:
            _warn(f"{name} is undefined for every category; NaN")
        return math.nan
    return math.fsum(finite) / len(finite)


def compute_contrast_geometry(
    harmful: torch.Tensor,
    categories: Sequence[str],
    matched: torch.Tensor,
    matched_categories: Sequence[str],
    unmatched: torch.Tensor,
) -> dict[str, Any]:
    """Norms and cosines of the unmatched, matched and topic contrasts, per category.

    Args:
        harmful: (n, d_model) harmful activations at one layer.
        categories: n category names.
        matched: (m, d_model) topic-matched harmless activations at the layer.
        matched_categories: m category names.
        unmatched: (p, d_model) generic harmless activations, or their (d_model,) mean.

    Returns:
        ``norm_ratio_matched_to_unmatched`` (mean over categories of |m_c| / |u_c|),
        ``cos_matched_unmatched`` (mean of cos(m_c, u_c)), ``cos_topic_unmatched`` (mean of
        cos(t_c, u_c)), the means of ``norm_unmatched`` |u_c|, ``norm_matched`` |m_c| and
        ``norm_topic`` |t_c|, ``per_category`` (all of these per category, with sample counts),
        ``categories`` (those used) and ``skipped_categories`` (category -> which side has no
        prompts). Means are over the categories where the value is finite (the others are
        named in a warning); NaN when there are none.
    """
    _check_rows("harmful", harmful, categories)
    _check_rows("matched", matched, matched_categories)
    generic_mean = _mean64(unmatched)  # (d_model,)
    harmful_rows, matched_rows = (
        _rows_by_category(categories),
        _rows_by_category(matched_categories),
    )
    skipped = {c: "no matched prompts" for c in harmful_rows if c not in matched_rows}
    skipped |= {c: "no harmful prompts" for c in matched_rows if c not in harmful_rows}
    if skipped:
        _warn(f"categories skipped by the contrast geometry: {skipped}")

    per_category: dict[str, dict[str, float]] = {}
    for category, rows in harmful_rows.items():
        if category not in matched_rows:
            continue
        harmful_mean = _mean64(harmful[rows])  # (d_model,)
        matched_mean = _mean64(matched[matched_rows[category]])  # (d_model,)
        unmatched_contrast = harmful_mean - generic_mean  # u_c
        matched_contrast = harmful_mean - matched_mean  # m_c
        topic = matched_mean - generic_mean  # t_c
        norm_u, norm_m = unmatched_contrast.norm().item(), matched_contrast.norm().item()
        per_category[category] = {
            "norm_unmatched": norm_u,
            "norm_matched": norm_m,
            "norm_topic": topic.norm().item(),
            "norm_ratio_matched_to_unmatched": _ratio(norm_m, norm_u),
            "cos_matched_unmatched": _cosine(matched_contrast, unmatched_contrast),
            "cos_topic_unmatched": _cosine(topic, unmatched_contrast),
            "n_harmful": len(rows),
            "n_matched": len(matched_rows[category]),
        }

    labels = list(per_category)
    result: dict[str, Any] = {}
    for key in (
        "norm_ratio_matched_to_unmatched",
        "cos_matched_unmatched",
        "cos_topic_unmatched",
        "norm_unmatched",
        "norm_matched",
        "norm_topic",
    ):
        result[key] = _finite_mean([per_category[c][key] for c in labels], key, labels)
    result["per_category"] = per_category
    result["categories"] = labels
    result["skipped_categories"] = skipped
    return result


def _paired_categories(
    harmful_categories: Sequence[str], matched_categories: Sequence[str], minimum: int, what: str
) -> tuple[dict[str, list[int]], dict[str, list[int]], list[str], dict[str, str]]:
    """Rows per category, the categories with >= ``minimum`` prompts on both sides (in order of
    first appearance among the harmful prompts) and the skipped ones with the reason."""
    harmful_rows = _rows_by_category(harmful_categories)
    matched_rows = _rows_by_category(matched_categories)
    skipped: dict[str, str] = {}
    used: list[str] = []
    for category in harmful_rows:
        if category not in matched_rows:
            skipped[category] = "no matched prompts"
        elif min(len(harmful_rows[category]), len(matched_rows[category])) < minimum:
            skipped[category] = f"fewer than {minimum} prompts on a side"
        else:
            used.append(category)
    skipped |= {c: "no harmful prompts" for c in matched_rows if c not in harmful_rows}
    if skipped:
        _warn(f"categories skipped by {what}: {skipped}")
    return harmful_rows, matched_rows, used, skipped


def _population_std(values: list[float]) -> float:
    """Population standard deviation of the finite values; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    mean = math.fsum(finite) / len(finite)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / len(finite))


def _plain_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return math.fsum(finite) / len(finite) if finite else math.nan


def split_half_reliability(
    harmful: torch.Tensor,
    harmful_categories: Sequence[str],
    matched: torch.Tensor,
    matched_categories: Sequence[str],
    unmatched: torch.Tensor,
    seed: int,
    n_splits: int = 20,
) -> dict[str, Any]:
    """How much of m_c and u_c is signal and how much is sampling noise, by random halves.

    For each of ``n_splits`` seeded splits, each category's harmful prompts and its matched
    prompts are split at random into halves A and B (sizes floor(n/2) and ceil(n/2)), and so is
    the generic harmless pool (when given as activations with >= 2 rows; a (d_model,) mean is
    used as is by both halves). On each half: m_c = mean(harmful_c) - mean(matched_c) and
    u_c = mean(harmful_c) - mean(generic). Reported per category, then averaged over categories:

    - ``cos_matched_split_half``: cos(m_c^A, m_c^B), mean over splits (``_std``: its spread).
      The two halves share no prompt, so their estimation errors e_A, e_B are independent; in
      high dimension cos ~ |m|^2 / (|m|^2 + eps^2), eps^2 the squared norm of a half's error.
      Near 1: m_c is a stable direction; near 0: m_c is mostly sampling noise (two halves of the
      same data do not agree on it); 0.5: the noise of a half is as large as the signal.
    - ``cos_unmatched_split_half``: the same for u_c.
    - ``cos_matched_to_truth_estimate`` (and ``_unmatched_``): sqrt(2 rho / (1 + rho)) with rho
      the mean split-half cosine (clipped at 0): under the same approximation, the expected
      cosine between the full-sample estimate (half the error variance) and the true m_c.
    - ``norm_ratio_half_mean`` / ``norm_ratio_half_std`` / ``norm_ratio_half_abs_diff``: mean,
      population standard deviation and mean |A - B| of the 2 n_splits half-sample ratios
      |m_c|/|u_c|. Noise inflates a norm (E|m_hat|^2 = |m|^2 + eps^2), so a small ratio such as
      0.1 is biased upward and can be mostly noise.
    - ``norm_ratio_debiased``: sqrt(mean_s(m_A . m_B) / mean_s(u_A . u_B)). Since the halves'
      errors are independent, m_A . m_B estimates |m_c|^2 without the noise term (it can be
      negative when the signal is below the noise: then the ratio is reported as 0).

    Args:
        harmful: (n, d_model) harmful activations at one layer; harmful_categories: n names.
        matched: (m, d_model) matched harmless activations; matched_categories: m names.
        unmatched: (p, d_model) generic harmless activations, or their (d_model,) mean.
        seed: seeds the splits (a torch.Generator); the same inputs and seed give the same
            result.
        n_splits: number of random splits (>= 1).

    Returns:
        The means over categories of the statistics above (NaN with a warning when no category
        has a finite value), ``per_category`` (the statistics with ``n_harmful``/``n_matched``),
        ``categories``, ``skipped_categories`` (category -> reason; a side needs >= 2 prompts),
        ``n_splits``, ``seed`` and ``generic_split`` (whether the generic pool was split).
    """
    _check_rows("harmful", harmful, harmful_categories)
    _check_rows("matched", matched, matched_categories)
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    harmful_rows, matched_rows, used, skipped = _paired_categories(
        harmful_categories, matched_categories, 2, "the split-half reliability"
    )
    generic_split = unmatched.ndim == 2 and unmatched.shape[0] >= 2
    samples = _sample_split_halves(
        harmful, harmful_rows, matched, matched_rows, used, unmatched, seed, n_splits
    )
    per_category = {
        c: {
            **_split_half_statistics(samples[c]),
            "n_harmful": len(harmful_rows[c]),
            "n_matched": len(matched_rows[c]),
        }
        for c in used
    }
    labels = list(per_category)
    return _means_over_categories(per_category, _SPLIT_HALF_STATISTICS) | {
        "per_category": per_category,
        "categories": labels,
        "skipped_categories": skipped,
        "n_splits": n_splits,
        "seed": int(seed),
        "generic_split": generic_split,
    }


def _means_over_categories(
    per_category: dict[str, dict[str, Any]], keys: Sequence[str]
) -> dict[str, float]:
    """For each key, its mean over the categories' finite values (``_finite_mean``)."""
    labels = list(per_category)
    return {key: _finite_mean([per_category[c][key] for c in labels], key, labels) for key in keys}


_SPLIT_HALF_STATISTICS = (
    "cos_matched_split_half",
    "cos_unmatched_split_half",
    "cos_matched_to_truth_estimate",
    "cos_unmatched_to_truth_estimate",
    "norm_ratio_half_mean",
    "norm_ratio_half_std",
    "norm_ratio_half_abs_diff",
    "norm_ratio_debiased",
)


def _random_halves(rows: list[int], generator: torch.Generator) -> tuple[list[int], list[int]]:
    """``rows`` split at random into halves of sizes floor(n/2) and ceil(n/2)."""
    order = torch.randperm(len(rows), generator=generator).tolist()
    cut = len(rows) // 2
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]


def _sample_split_halves(
    harmful: torch.Tensor,
    harmful_rows: dict[str, list[int]],
    matched: torch.Tensor,
    matched_rows: dict[str, list[int]],
    used: list[str],
    unmatched: torch.Tensor,
    seed: int,
    n_splits: int,
) -> dict[str, dict[str, list[float]]]:
    """Per category, the raw half-sample quantities of ``n_splits`` seeded random splits.

    Each split draws, in this order, the generic pool's halves (when it has >= 2 rows) and then
    each category's harmful and matched halves, from one generator seeded with ``seed``. Per
    split and category it records cos(m_A, m_B) and cos(u_A, u_B) (``cos_m``, ``cos_u``), the
    ratios |m|/|u| of half A and half B (``ratio_a``, ``ratio_b``) and the dot products
    m_A . m_B and u_A . u_B (``dot_m``, ``dot_u``).
    """
    generic_split = unmatched.ndim == 2 and unmatched.shape[0] >= 2
    generator = torch.Generator().manual_seed(int(seed))
    samples: dict[str, dict[str, list[float]]] = {
        c: {k: [] for k in ("cos_m", "cos_u", "ratio_a", "ratio_b", "dot_m", "dot_u")} for c in used
    }
    for _ in range(n_splits):
        if generic_split:
            generic_a, generic_b = _random_halves(list(range(unmatched.shape[0])), generator)
            generic_means = (_mean64(unmatched[generic_a]), _mean64(unmatched[generic_b]))
        else:
            generic_means = (_mean64(unmatched), _mean64(unmatched))
        for category in used:
            harmful_halves = _random_halves(harmful_rows[category], generator)
            matched_halves = _random_halves(matched_rows[category], generator)
            contrasts = []
            for harmful_half, matched_half, generic_mean in zip(
                harmful_halves, matched_halves, generic_means, strict=True
            ):
                harmful_mean = _mean64(harmful[harmful_half])
                contrasts.append(
                    (harmful_mean - _mean64(matched[matched_half]), harmful_mean - generic_mean)
                )
            (m_a, u_a), (m_b, u_b) = contrasts
            record = samples[category]
            record["cos_m"].append(_cosine(m_a, m_b))
            record["cos_u"].append(_cosine(u_a, u_b))
            record["ratio_a"].append(_ratio(m_a.norm().item(), u_a.norm().item()))
            record["ratio_b"].append(_ratio(m_b.norm().item(), u_b.norm().item()))
            record["dot_m"].append(float(m_a @ m_b))
            record["dot_u"].append(float(u_a @ u_b))
    return samples


def _cos_to_truth(rho: float) -> float:
    """sqrt(2 rho / (1 + rho)), rho clipped at 0: the expected cosine between a full-sample
    estimate and the truth, given the split-half cosine rho."""
    if not math.isfinite(rho):
        return math.nan
    rho = max(rho, 0.0)
    return math.sqrt(2 * rho / (1 + rho))


def _split_half_statistics(record: dict[str, list[float]]) -> dict[str, float]:
    """One category's split-half statistics (see ``split_half_reliability``) from its samples."""
    half_ratios = record["ratio_a"] + record["ratio_b"]
    signal_m, signal_u = _plain_mean(record["dot_m"]), _plain_mean(record["dot_u"])
    cos_m, cos_u = _plain_mean(record["cos_m"]), _plain_mean(record["cos_u"])
    return {
        "cos_matched_split_half": cos_m,
        "cos_matched_split_half_std": _population_std(record["cos_m"]),
        "cos_unmatched_split_half": cos_u,
        "cos_unmatched_split_half_std": _population_std(record["cos_u"]),
        "cos_matched_to_truth_estimate": _cos_to_truth(cos_m),
        "cos_unmatched_to_truth_estimate": _cos_to_truth(cos_u),
        "norm_ratio_half_mean": _plain_mean(half_ratios),
        "norm_ratio_half_std": _population_std(half_ratios),
        "norm_ratio_half_abs_diff": _plain_mean(
            [abs(a - b) for a, b in zip(record["ratio_a"], record["ratio_b"], strict=True)]
        ),
        "norm_ratio_debiased": (
            math.sqrt(max(signal_m, 0.0) / signal_u)
            if math.isfinite(signal_m) and signal_u > 0
            else math.nan
        ),
    }


def _random_derangement(count: int, generator: torch.Generator) -> list[int]:
    """A uniformly random permutation of range(count) without fixed points (count >= 2), by
    rejection (about e tries on average)."""
    while True:
        permutation = torch.randperm(count, generator=generator).tolist()
        if all(index != image for index, image in enumerate(permutation)):
            return permutation


_NULL_STATISTICS = (
    "norm_ratio_matched_to_unmatched",
    "cos_matched_unmatched",
    "cos_topic_unmatched",
)


def _contrast_statistics(
    harmful_mean: torch.Tensor, matched_mean: torch.Tensor, generic_mean: torch.Tensor
) -> dict[str, float]:
    unmatched_contrast = harmful_mean - generic_mean  # u_c
    matched_contrast = harmful_mean - matched_mean  # m_c
    topic = matched_mean - generic_mean  # t_c
    return {
        "norm_ratio_matched_to_unmatched": _ratio(
            matched_contrast.norm().item(), unmatched_contrast.norm().item()
        ),
        "cos_matched_unmatched": _cosine(matched_contrast, unmatched_contrast),
        "cos_topic_unmatched": _cosine(topic, unmatched_contrast),
    }


def shuffled_category_null(
    harmful: torch.Tensor,
    harmful_categories: Sequence[str],
    matched: torch.Tensor,
    matched_categories: Sequence[str],
    unmatched: torch.Tensor,
    seed: int,
    n_derangements: int = 20,
) -> dict[str, Any]:
    """The contrast geometry when each category is matched against ANOTHER category's set.

    Under the null, the harmful prompts of category c are contrasted with the matched prompts of
    category pi(c), pi a random derangement of the categories (no category keeps its own set;
    seeded, ``n_derangements`` of them drawn independently, so with few categories some repeat:
    there is 1 derangement of 2 categories, 2 of 3, 9 of 4, 133496 of 9). For each derangement
    the statistics of ``compute_contrast_geometry`` are averaged over categories:
    |m_c|/|u_c| (``norm_ratio_matched_to_unmatched``), cos(m_c, u_c) (``cos_matched_unmatched``)
    and cos(t_c, u_c) (``cos_topic_unmatched``), with m_c = mean(harmful_c) - mean(matched_pi(c)),
    t_c = mean(matched_pi(c)) - G and u_c = mean(harmful_c) - G unchanged.

    If the matched sets carried no category-specific topic (every category's matched prompts
    drawn from one distribution), the real pairing would be one more random pairing and the real
    values would fall inside the null's spread. A real ratio clearly below the null says the
    same-category matched mean cancels a category-specific component of u_c; one inside it says
    the "matched" cancellation is no more specific than subtracting any harmless-topic mean.

    Args:
        harmful: (n, d_model) harmful activations at one layer; harmful_categories: n names.
        matched: (m, d_model) matched harmless activations; matched_categories: m names.
        unmatched: (p, d_model) generic harmless activations, or their (d_model,) mean.
        seed: seeds the derangements (a torch.Generator).
        n_derangements: derangements drawn (>= 1).

    Returns:
        For each statistic S above: ``S`` (the real value, as ``compute_contrast_geometry``
        gives it), ``S_null_mean`` and ``S_null_std`` (mean and population standard deviation
        over derangements of the category-averaged value), ``S_null_p_lower`` and
        ``S_null_p_upper`` ((1 + #{null <= real}) / (1 + n) and likewise >=: permutation
        p-values for "real below / above the null"); ``per_category`` (real value and null mean
        per category), ``null_values`` (S -> the n category-averaged null values),
        ``categories``, ``skipped_categories``, ``n_derangements``,
        ``n_distinct_derangements`` and ``seed``. With fewer than two usable categories there
        is no derangement: the null values are NaN (with a warning).
    """
    _check_rows("harmful", harmful, harmful_categories)
    _check_rows("matched", matched, matched_categories)
    if n_derangements < 1:
        raise ValueError(f"n_derangements must be >= 1, got {n_derangements}")
    harmful_rows, matched_rows, used, skipped = _paired_categories(
        harmful_categories, matched_categories, 1, "the shuffled-category null"
    )
    generic_mean = _mean64(unmatched)
    harmful_means = {c: _mean64(harmful[harmful_rows[c]]) for c in used}
    matched_means = {c: _mean64(matched[matched_rows[c]]) for c in used}

    real = {c: _contrast_statistics(harmful_means[c], matched_means[c], generic_mean) for c in used}
    null_values, per_category_null, distinct = _draw_shuffled_null(
        harmful_means, matched_means, generic_mean, used, seed, n_derangements
    )
    result: dict[str, Any] = {}
    for key in _NULL_STATISTICS:
        real_value = _finite_mean([real[c][key] for c in used], key, used)
        result |= _compare_with_null(key, real_value, null_values[key])
    result["per_category"] = {
        c: real[c]
        | {f"{key}_null_mean": _plain_mean(per_category_null[c][key]) for key in _NULL_STATISTICS}
        | {"n_harmful": len(harmful_rows[c]), "n_matched": len(matched_rows[c])}
        for c in used
    }
    result |= {
        "null_values": null_values,
        "categories": used,
        "skipped_categories": skipped,
        "n_derangements": n_derangements if len(used) >= 2 else 0,
        "n_distinct_derangements": len(distinct),
        "seed": int(seed),
    }
    return result


def _draw_shuffled_null(
    harmful_means: dict[str, torch.Tensor],
    matched_means: dict[str, torch.Tensor],
    generic_mean: torch.Tensor,
    used: list[str],
    seed: int,
    n_derangements: int,
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]], set[tuple[int, ...]]]:
    """The null draws of ``shuffled_category_null``: per statistic, the category-averaged value
    of each seeded derangement; per category and statistic, its value under each derangement;
    and the set of distinct derangements drawn. Empty (with a warning) with < 2 categories."""
    null_values: dict[str, list[float]] = {key: [] for key in _NULL_STATISTICS}
    per_category_null: dict[str, dict[str, list[float]]] = {
        c: {key: [] for key in _NULL_STATISTICS} for c in used
    }
    distinct: set[tuple[int, ...]] = set()
    if len(used) < 2:
        _warn(
            f"the shuffled-category null needs two or more categories with prompts on both "
            f"sides, got {used}; null values are NaN"
        )
        return null_values, per_category_null, distinct
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(n_derangements):
        permutation = _random_derangement(len(used), generator)
        distinct.add(tuple(permutation))
        statistics = {
            c: _contrast_statistics(
                harmful_means[c], matched_means[used[permutation[i]]], generic_mean
            )
            for i, c in enumerate(used)
        }
        for key in _NULL_STATISTICS:
            for c in used:
                per_category_null[c][key].append(statistics[c][key])
            null_values[key].append(_plain_mean([statistics[c][key] for c in used]))
    return null_values, per_category_null, distinct


def _compare_with_null(key: str, real_value: float, null_values: list[float]) -> dict[str, float]:
    """``key`` (the real value), its null's mean and population std over the finite null values,
    and the permutation p-values (1 + #{null <= real}) / (1 + n) and likewise >=."""
    values = [v for v in null_values if math.isfinite(v)]
    result = {
        key: real_value,
        f"{key}_null_mean": _plain_mean(values),
        f"{key}_null_std": _population_std(values),
    }
    if values and math.isfinite(real_value):
        result[f"{key}_null_p_lower"] = (1 + sum(v <= real_value for v in values)) / (
            1 + len(values)
        )
        result[f"{key}_null_p_upper"] = (1 + sum(v >= real_value for v in values)) / (
            1 + len(values)
        )
    else:
        result[f"{key}_null_p_lower"] = result[f"{key}_null_p_upper"] = math.nan
    return result


def compute_direction_cosines(vectors: torch.Tensor) -> list[list[float]]:
    """Pairwise cosines of the directions: (k, d_model) -> k x k nested list.

    Rows and columns of zero-norm or non-finite directions are NaN (with a warning).
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (k, d_model), got {tuple(vectors.shape)}")
    vectors = vectors.double()
    norms = vectors.norm(dim=1)  # (k,)
    valid = torch.isfinite(vectors).all(dim=1) & (norms > 0)
    if not bool(valid.all()):
        _warn(
            f"directions {torch.nonzero(~valid).flatten().tolist()} are zero or non-finite; NaN cosines"
        )
    units = torch.where(valid[:, None], vectors / norms.clamp_min(1e-300)[:, None], 0.0)
    cosines = units @ units.T  # (k, k)
    undefined = ~(valid[:, None] & valid[None, :])
    cosines[undefined] = math.nan
    return cosines.tolist()


def compute_cosine_to_diff_in_means(
    vectors: torch.Tensor, harmful: torch.Tensor, unmatched: torch.Tensor
) -> list[float]:
    """Each direction's cosine with the global difference in means mean(harmful) - mean(unmatched).

    Args:
        vectors: (k, d_model) directions.
        harmful: (n, d_model) harmful activations at the layer.
        unmatched: (p, d_model) generic harmless activations, or their (d_model,) mean.

    Returns:
        k cosines; NaN (with a warning) where a direction or the difference is zero.
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (k, d_model), got {tuple(vectors.shape)}")
    diff_in_means = _mean64(harmful) - _mean64(unmatched)  # (d_model,)
    cosines = [_cosine(vector, diff_in_means) for vector in vectors]
    if any(not math.isfinite(c) for c in cosines):
        _warn("some cosines to the difference in means are undefined (zero vector); NaN")
    return cosines


def _orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """(k, d) -> (r, d) orthonormal rows spanning the non-zero, finite directions."""
    vectors = vectors.double()
    vectors = vectors[torch.isfinite(vectors).all(dim=1) & (vectors.norm(dim=1) > 0)]
    if len(vectors) == 0:
        return vectors
    _, singular_values, vh = torch.linalg.svd(vectors, full_matrices=False)  # (r,), (r, d)
    tolerance = singular_values[0] * max(vectors.shape) * _RANK_EPS
    return vh[singular_values > tolerance]


def compute_capture(
    directions: torch.Tensor,
    harmful: torch.Tensor,
    categories: Sequence[str],
    matched: torch.Tensor,
    matched_categories: Sequence[str],
) -> float:
    """Fraction of a refused/answered pair's activation difference inside the directions' span.

    Pairs are the i-th harmful and the i-th matched prompt of the same category (zipped within
    the category; the longer side's extras are unused). For x = h_harmful - h_matched and P the
    orthogonal projector onto span(directions), capture = mean over pairs of |P x| / |x|: the
    norm fraction (not the squared, variance fraction), in [0, 1]. Zero directions are ignored;
    with no non-zero direction the capture is 0. Pairs with x = 0 are left out; with no usable
    pair the result is NaN (with a warning).

    Args:
        directions: (k, d_model) directions (any scale).
        harmful: (n, d_model) harmful activations; categories: n names.
        matched: (m, d_model) matched harmless activations; matched_categories: m names.
    """
    _check_rows("harmful", harmful, categories)
    _check_rows("matched", matched, matched_categories)
    basis = _orthonormal_basis(directions)  # (r, d_model)
    matched_rows = _rows_by_category(matched_categories)
    harmful_index, matched_index = [], []
    for category, rows in _rows_by_category(categories).items():
        for h, m in zip(rows, matched_rows.get(category, []), strict=False):
            harmful_index.append(h)
            matched_index.append(m)
    differences = harmful[harmful_index].double() - matched[matched_index].double()  # (pairs, d)
    fractions = _captured_fractions(basis, differences)  # (pairs,), NaN where x = 0
    usable = torch.isfinite(fractions)
    if not bool(usable.any()):
        _warn("no harmful/matched pair with a non-zero finite difference; capture is NaN")
        return math.nan
    if len(basis) == 0:
        _warn("no non-zero direction to capture with; capture is 0")
    return float(fractions[usable].mean())


def _captured_fractions(basis: torch.Tensor, differences: torch.Tensor) -> torch.Tensor:
    """|P x| / |x| for each row x of ``differences`` (float64), P the orthogonal projector onto
    the span of ``basis`` (orthonormal rows, possibly none: then 0). NaN where x is zero or
    non-finite."""
    differences = differences.double()
    norms = differences.norm(dim=1)  # (pairs,)
    usable = torch.isfinite(norms) & (norms > 0)
    fractions = torch.full_like(norms, math.nan)
    if len(basis) == 0:
        fractions[usable] = 0.0
        return fractions
    projected = (differences[usable] @ basis.T).norm(dim=1)  # |P x| = |B x|, B orthonormal rows
    fractions[usable] = projected / norms[usable]
    return fractions


def _category_pair_fractions(
    basis: torch.Tensor, refused: torch.Tensor, answered: torch.Tensor, category: str
) -> torch.Tensor:
    """|P x| / |x| for every (refused, answered) pair of one category, x = h_refused - h_answered,
    leaving out (with a warning) the pairs whose difference is zero or non-finite."""
    refused = refused.double()  # (a, d)
    answered = answered.double()  # (b, d)
    differences = (refused[:, None, :] - answered[None, :, :]).reshape(-1, refused.shape[1])
    fractions = _captured_fractions(basis, differences)  # (a * b,)
    usable = torch.isfinite(fractions)
    if not bool(usable.all()):
        _warn(
            f"{int((~usable).sum())} pairs of category {category!r} have a zero or non-finite "
            "activation difference; left out of the behavioural capture"
        )
    return fractions[usable]


def compute_behavioural_capture(
    vectors: torch.Tensor,
    refused_harmful_acts: torch.Tensor,
    refused_categories: Sequence[str],
    answered_matched_acts: torch.Tensor,
    answered_categories: Sequence[str],
) -> dict[str, Any]:
    """Capture on held-out pairs chosen by behaviour (method.md, Geometry: capture).

    A pair is (a held-out harmful prompt the unedited model refused, a held-out matched prompt
    of the same category it answered); every such pair within a category is used (all
    refused x answered combinations, so no prompt order matters). For the pair's activation
    difference x = h_refused - h_answered and P the orthogonal projector onto
    span(vectors), the pair's capture is |P x| / |x| (the norm fraction, in [0, 1], as in
    ``compute_capture``). Unlike ``compute_capture`` on the extraction prompts, these prompts did
    not shape the directions, and the pairs differ in what the model did, not only in the
    prompt set they came from.

    Args:
        vectors: (k, d_model) directions (any scale; zero or non-finite ones are ignored).
        refused_harmful_acts: (n, d_model) activations at the layer of the held-out harmful
            prompts the unedited model refused; refused_categories: their n categories.
        answered_matched_acts: (m, d_model) activations at the layer of the held-out matched
            prompts it answered; answered_categories: their m categories.

    Returns:
        ``capture`` (mean over all pairs; NaN with a warning when there is no usable pair),
        ``capture_category_mean`` (mean over categories of the per-category means),
        ``n_pairs``, ``per_category`` (category -> capture, n_pairs, n_refused, n_answered) and
        ``skipped_categories`` (category -> which side has no prompts). A pair whose difference
        is zero is left out. With no non-zero direction every capture is 0 (with a warning).
    """
    _check_rows("refused_harmful_acts", refused_harmful_acts, refused_categories)
    _check_rows("answered_matched_acts", answered_matched_acts, answered_categories)
    basis = _orthonormal_basis(vectors)  # (r, d_model)
    if len(basis) == 0:
        _warn("no non-zero direction to capture with; capture is 0")
    refused_rows = _rows_by_category(refused_categories)
    answered_rows = _rows_by_category(answered_categories)
    skipped = {c: "no answered matched prompt" for c in refused_rows if c not in answered_rows}
    skipped |= {c: "no refused harmful prompt" for c in answered_rows if c not in refused_rows}
    if skipped:
        _warn(f"categories skipped by the behavioural capture: {skipped}")
    per_category: dict[str, dict[str, Any]] = {}
    all_fractions: list[torch.Tensor] = []
    for category, rows in refused_rows.items():
        if category not in answered_rows:
            continue
        fractions = _category_pair_fractions(
            basis,
            refused_harmful_acts[rows],
            answered_matched_acts[answered_rows[category]],
            category,
        )
        all_fractions.append(fractions)
        per_category[category] = {
            "capture": float(fractions.mean()) if len(fractions) else math.nan,
            "n_pairs": len(fractions),
            "n_refused": len(rows),
            "n_answered": len(answered_rows[category]),
        }
    pooled = torch.cat(all_fractions) if all_fractions else torch.zeros(0, dtype=torch.float64)
    if len(pooled) == 0:
        _warn(
            "no refused-harmful / answered-matched pair of the same category with a non-zero "
            "difference; behavioural capture is NaN"
        )
    labels = list(per_category)
    return {
        "capture": float(pooled.mean()) if len(pooled) else math.nan,
        "capture_category_mean": _finite_mean(
            [per_category[c]["capture"] for c in labels], "behavioural capture", labels
        ),
        "n_pairs": len(pooled),
        "per_category": per_category,
        "skipped_categories": skipped,
    }


def compute_perturbation_ratio(original: torch.Tensor, ablated: torch.Tensor, layer: int) -> float:
    """How much an edit moves the residual stream, in units of its natural layer-to-layer change.

    ratio = mean_i |ablated[i, L] - original[i, L]| / mean_i |original[i, L] - original[i, L-1]|
    (a ratio of means over prompts). At L = 0 the denominator is the layer's own mean norm
    mean_i |original[i, 0]|, as there is no previous layer. Petrov's "noise floor": a ratio well
    below 1 means the edit hides inside the stream's ordinary variation.

    Args:
        original: (n, n_layers, d_model) activations of the unedited model (e.g. harmful prompts).
        ablated: same shape, the edited model on the same prompts.
        layer: the edited layer (negative counts from the end).

    Returns:
        The ratio; NaN (with a warning) when the denominator is zero or anything is non-finite.
    """
    if original.shape != ablated.shape or original.ndim != 3:
        raise ValueError(
            "original and ablated must both be (n, n_layers, d_model); got "
            f"{tuple(original.shape)} and {tuple(ablated.shape)}"
        )
    n_layers = original.shape[1]
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for {n_layers} layers")
    layer %= n_layers
    here = original[:, layer].double()  # (n, d_model)
    change = (ablated[:, layer].double() - here).norm(dim=1).mean().item()
    natural_step = here if layer == 0 else here - original[:, layer - 1].double()
    natural = natural_step.norm(dim=1).mean().item()
    ratio = _ratio(change, natural)
    if not math.isfinite(ratio):
        _warn(f"perturbation ratio is undefined (change {change}, natural change {natural}); NaN")
    return ratio


@dataclass
class LayerActivations:
    """One layer's training activations: harmful, matched and unmatched rows, with categories."""

    harmful: torch.Tensor  # (n_harmful, d_model)
    harmful_categories: list[str]
    matched: torch.Tensor  # (n_matched, d_model)
    matched_categories: list[str]
    unmatched: torch.Tensor  # (n_unmatched, d_model)


@dataclass
class HeldOutActivations:
    """The unedited model's held-out evaluation at one layer, with its outcomes: the pairs of a
    refused harmful prompt and an answered same-category matched prompt, for behavioural
    capture."""

    harmful: torch.Tensor  # (n_eval_harmful, d_model)
    harmful_categories: list[str]
    harmful_labels: list[str]
    matched: torch.Tensor  # (n_eval_matched, d_model)
    matched_categories: list[str]
    matched_labels: list[str]


def compute_contrast_block(train: LayerActivations, seed: int) -> dict[str, Any]:
    """The part of a trial's geometry that depends on the training activations and the seed
    alone, not on the directions: the contrast statistics with their two null baselines
    (split-half reliability, shuffled-category null). A sweep over weights or ablation settings
    at one layer computes it once (the pipeline memoises it)."""
    contrast_args = (
        train.harmful,
        train.harmful_categories,
        train.matched,
        train.matched_categories,
        train.unmatched,
    )
    contrast = compute_contrast_geometry(*contrast_args)
    split_half = split_half_reliability(*contrast_args, seed=seed)
    null = shuffled_category_null(*contrast_args, seed=seed)
    return {
        "norm_ratio_matched_to_unmatched": contrast["norm_ratio_matched_to_unmatched"],
        "cos_matched_unmatched": contrast["cos_matched_unmatched"],
        "cos_topic_unmatched": contrast["cos_topic_unmatched"],
        "per_category": contrast.get("per_category", {}),
        "split_half": {k: v for k, v in split_half.items() if k != "per_category"},
        "shuffled_null": {
            k: v for k, v in null.items() if k not in ("per_category", "null_values")
        },
    }


def compute_trial_geometry(
    train: LayerActivations,
    vectors: torch.Tensor,
    seed: int,
    held_out: HeldOutActivations | None = None,
    perturbation_ratio: float = math.nan,
    contrast: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``geometry`` block of a trial's results (docs/results-contract.md).

    The contrast geometry (norms, ratios, cosines) with its two null baselines beside it:
    split-half reliability (how much of m_c and u_c is sampling noise) and the shuffled-category
    null (what the statistics are when the matched set is another category's); the directions'
    own geometry; capture on the training prompts and, when the held-out evaluation is given,
    on held-out pairs chosen by behaviour. ``contrast``: :func:`compute_contrast_block` of the
    same ``train`` and ``seed`` when already computed.
    """
    if contrast is None:
        contrast = compute_contrast_block(train, seed)
    has_vectors = len(vectors) > 0
    geometry: dict[str, Any] = {
        "norm_ratio_matched_to_unmatched": contrast["norm_ratio_matched_to_unmatched"],
        "cos_matched_unmatched": contrast["cos_matched_unmatched"],
        "cos_topic_unmatched": contrast["cos_topic_unmatched"],
        "direction_cosines": compute_direction_cosines(vectors) if has_vectors else [],
        "cosine_to_diff_in_means": (
            compute_cosine_to_diff_in_means(vectors, train.harmful, train.unmatched)
            if has_vectors
            else []
        ),
        "capture": (
            compute_capture(
                vectors,
                train.harmful,
                train.harmful_categories,
                train.matched,
                train.matched_categories,
            )
            if has_vectors
            else math.nan
        ),
        "perturbation_ratio": perturbation_ratio,
        "per_category": contrast["per_category"],
        "split_half": contrast["split_half"],
        "shuffled_null": contrast["shuffled_null"],
    }
    geometry["behavioural_capture"] = math.nan
    geometry["behavioural_capture_pairs"] = 0
    if has_vectors and held_out is not None:
        refused = [i for i, label in enumerate(held_out.harmful_labels) if label == "REFUSE"]
        answered = [i for i, label in enumerate(held_out.matched_labels) if label == "COMPLY"]
        behavioural = compute_behavioural_capture(
            vectors,
            held_out.harmful[refused],
            [held_out.harmful_categories[i] for i in refused],
            held_out.matched[answered],
            [held_out.matched_categories[i] for i in answered],
        )
        geometry["behavioural_capture"] = behavioural["capture"]
        geometry["behavioural_capture_pairs"] = behavioural["n_pairs"]
    return geometry
