"""Null baselines for the geometry: split-half reliability, the shuffled-category null and
capture on behaviourally chosen held-out pairs, on synthetic data whose truth is known."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from abliterate.geometry import (
    compute_behavioural_capture,
    compute_capture,
    compute_contrast_geometry,
    shuffled_category_null,
    split_half_reliability,
)


@dataclass
class Synthetic:
    harmful: torch.Tensor
    harmful_categories: list[str]
    matched: torch.Tensor
    matched_categories: list[str]
    generic: torch.Tensor
    topics: dict[str, torch.Tensor]  # true t_c (the generic population mean is 0)
    contrast: torch.Tensor  # true m_c, the same for every category

    def args(self):
        return (
            self.harmful,
            self.harmful_categories,
            self.matched,
            self.matched_categories,
            self.generic,
        )


def synthetic(
    seed: int,
    *,
    category_structure: bool,
    categories: int = 8,
    n: int = 40,
    d: int = 32,
    topic: float = 4.0,
    contrast: float = 1.0,
    noise: float = 1.0,
    n_generic: int = 200,
) -> Synthetic:
    """harmful_c ~ N(t_c + mu, noise^2 I), matched_c ~ N(t_c, noise^2 I), generic ~ N(0, noise^2 I).

    With ``category_structure`` every category has its own random topic t_c (norm ~ ``topic``);
    without, all categories share one t: every category's prompts come from one distribution.
    """
    generator = torch.Generator().manual_seed(seed)

    def vector(scale: float) -> torch.Tensor:
        return scale * torch.randn(d, generator=generator, dtype=torch.float64) / math.sqrt(d)

    shared_topic = vector(topic)
    mu = vector(contrast)
    harmful, harmful_categories, matched, matched_categories, topics = [], [], [], [], {}
    for index in range(categories):
        name = f"c{index}"
        topics[name] = vector(topic) if category_structure else shared_topic
        harmful.append(
            topics[name] + mu + noise * torch.randn(n, d, generator=generator, dtype=torch.float64)
        )
        matched.append(
            topics[name] + noise * torch.randn(n, d, generator=generator, dtype=torch.float64)
        )
        harmful_categories += [name] * n
        matched_categories += [name] * n
    generic = noise * torch.randn(n_generic, d, generator=generator, dtype=torch.float64)
    return Synthetic(
        torch.cat(harmful),
        harmful_categories,
        torch.cat(matched),
        matched_categories,
        generic,
        topics,
        mu,
    )


STATISTICS = ("norm_ratio_matched_to_unmatched", "cos_matched_unmatched", "cos_topic_unmatched")


# ---------------------------------------------------------------- shuffled-category null


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_null_matches_the_real_statistics_without_category_structure(seed):
    """Every category's prompts from one distribution: the real pairing is exchangeable with the
    shuffled ones, so the real value is (approximately) one more draw from the null distribution.
    Tolerance: |real - null mean| < 4 null standard deviations (probability ~6e-5 of failing
    for a normal null, at most 1/16 by Chebyshev; seeded, so deterministic) and within 5% of
    the null mean; measured |z| <= 2.1 over six data seeds."""
    data = synthetic(seed, category_structure=False)
    null = shuffled_category_null(*data.args(), seed=seed, n_derangements=50)
    for key in STATISTICS:
        real, mean, std = null[key], null[f"{key}_null_mean"], null[f"{key}_null_std"]
        assert std > 0
        assert abs(real - mean) < 4 * std, (key, real, mean, std)
        assert abs(real - mean) < 0.05 * abs(mean), (key, real, mean)
        # a permutation p-value away from the extremes 1/51 on both sides
        assert null[f"{key}_null_p_lower"] > 1 / 51 and null[f"{key}_null_p_upper"] > 1 / 51


@pytest.mark.parametrize("seed", [0, 1])
def test_null_separates_strong_category_structure(seed):
    """Own topic per category (|t_c| ~ 4, |m| ~ 1): the real m_c cancels t_c, |m_c|/|u_c| ~
    1/sqrt(17) ~ 0.24 plus noise, while the null's m = mu + t_c - t_pi(c) keeps two topics, ratio
    ~ sqrt(33/17) ~ 1.4. The real ratio and cos(m, u) lie far below every null draw; cos(t, u) far
    above (a random other topic is orthogonal to u_c)."""
    data = synthetic(seed, category_structure=True)
    null = shuffled_category_null(*data.args(), seed=seed, n_derangements=50)
    key = "norm_ratio_matched_to_unmatched"
    assert null[key] < 0.5 < 1.2 < null[f"{key}_null_mean"]
    assert null[key] < null[f"{key}_null_mean"] - 10 * null[f"{key}_null_std"]
    assert min(null["null_values"][key]) > 2 * null[key]
    assert null[f"{key}_null_p_lower"] == pytest.approx(1 / 51)
    key = "cos_matched_unmatched"
    assert null[key] < null[f"{key}_null_mean"] - 10 * null[f"{key}_null_std"]
    key = "cos_topic_unmatched"
    assert null[key] > null[f"{key}_null_mean"] + 10 * null[f"{key}_null_std"]
    assert null[f"{key}_null_p_upper"] == pytest.approx(1 / 51)


def test_null_reports_the_real_values_of_the_contrast_geometry():
    data = synthetic(4, category_structure=True, categories=5, n=6)
    null = shuffled_category_null(*data.args(), seed=0, n_derangements=7)
    real = compute_contrast_geometry(*data.args())
    for key in STATISTICS:
        assert null[key] == pytest.approx(real[key], rel=1e-12)
        for category in real["categories"]:
            assert null["per_category"][category][key] == pytest.approx(
                real["per_category"][category][key], rel=1e-12
            )
    assert len(null["null_values"]["cos_matched_unmatched"]) == 7
    assert null["n_derangements"] == 7 and 1 <= null["n_distinct_derangements"] <= 7
    # seeded: the same seed gives the same null, another seed (generally) another
    again = shuffled_category_null(*data.args(), seed=0, n_derangements=7)
    assert again["null_values"] == null["null_values"]
    other = shuffled_category_null(*data.args(), seed=1, n_derangements=7)
    assert other["null_values"] != null["null_values"]


def test_null_with_two_categories_uses_the_swap():
    """Two categories have one derangement (the swap): computed by hand."""
    data = synthetic(5, category_structure=True, categories=2, n=3, d=4)
    null = shuffled_category_null(*data.args(), seed=3, n_derangements=4)
    assert null["n_distinct_derangements"] == 1
    harmful_means = {c: data.harmful[i * 3 : i * 3 + 3].mean(0) for i, c in enumerate(("c0", "c1"))}
    matched_means = {c: data.matched[i * 3 : i * 3 + 3].mean(0) for i, c in enumerate(("c0", "c1"))}
    generic = data.generic.mean(0)
    ratios = []
    for own, other in (("c0", "c1"), ("c1", "c0")):
        m = harmful_means[own] - matched_means[other]
        u = harmful_means[own] - generic
        ratios.append(float(m.norm() / u.norm()))
    expected = sum(ratios) / 2
    assert null["null_values"]["norm_ratio_matched_to_unmatched"] == pytest.approx([expected] * 4)
    assert null["norm_ratio_matched_to_unmatched_null_std"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:categories skipped:RuntimeWarning")
def test_null_degenerate_inputs_give_nan_with_a_warning():
    data = synthetic(6, category_structure=True, categories=3, n=4, d=4)
    only_c0 = [i for i, c in enumerate(data.harmful_categories) if c == "c0"]
    with pytest.warns(RuntimeWarning, match="two or more categories"):
        null = shuffled_category_null(
            data.harmful[only_c0],
            ["c0"] * len(only_c0),
            data.matched,
            data.matched_categories,
            data.generic,
            seed=0,
        )
    assert math.isnan(null["norm_ratio_matched_to_unmatched_null_mean"])
    assert math.isfinite(null["norm_ratio_matched_to_unmatched"])
    assert null["skipped_categories"] == {"c1": "no harmful prompts", "c2": "no harmful prompts"}
    with pytest.raises(ValueError, match="n_derangements"):
        shuffled_category_null(*data.args(), seed=0, n_derangements=0)


# ---------------------------------------------------------------- split-half reliability


@pytest.mark.parametrize("seed", [0, 1])
def test_split_half_is_near_one_for_a_large_clean_signal(seed):
    # |m| ~ 2 against a half-sample error of norm ~ 0.05 sqrt(32 * 2/20) ~ 0.06: cos ~ 0.999
    data = synthetic(seed, category_structure=True, contrast=2.0, noise=0.05)
    reliability = split_half_reliability(*data.args(), seed=seed, n_splits=10)
    assert reliability["cos_matched_split_half"] > 0.99
    assert reliability["cos_unmatched_split_half"] > 0.99
    assert reliability["cos_matched_to_truth_estimate"] > 0.99
    assert reliability["norm_ratio_half_std"] < 0.02
    # the true ratio mean_c |mu| / |t_c + mu|
    truth = sum(
        float(data.contrast.norm() / (t + data.contrast).norm()) for t in data.topics.values()
    ) / len(data.topics)
    assert reliability["norm_ratio_debiased"] == pytest.approx(truth, abs=0.02)
    assert reliability["norm_ratio_half_mean"] == pytest.approx(truth, abs=0.02)


@pytest.mark.parametrize("seed", [0, 1])
def test_split_half_is_near_zero_for_pure_noise(seed):
    """No signal at all: every set from N(0, I) in d = 64. Two independent noise vectors have
    cosine ~ N(0, 1/64), sd 0.125; the mean over 8 independent categories has sd <= 0.125 /
    sqrt(8) ~ 0.044 (splits of the same data are correlated, so no further reduction is
    assumed): |mean| < 0.2 is a > 4 sd margin. u_c is noise too, as the generic pool is split."""
    data = synthetic(seed, category_structure=False, topic=0.0, contrast=0.0, d=64)
    with pytest.warns(RuntimeWarning):  # the debiased ratio is undefined where u has no signal
        reliability = split_half_reliability(*data.args(), seed=seed, n_splits=20)
    assert abs(reliability["cos_matched_split_half"]) < 0.2
    assert abs(reliability["cos_unmatched_split_half"]) < 0.2
    assert reliability["generic_split"] is True
    # the half-sample ratio of two noise norms is ~1 and means nothing
    assert reliability["norm_ratio_half_mean"] > 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_half_predicts_how_well_the_full_sample_finds_the_truth(seed):
    """A weak signal (|m| ~ 1 against noise 1 in d = 64, 30 prompts a side): split-half cos ~
    0.1, and sqrt(2 rho / (1 + rho)) estimates the cosine between the full-sample m_c and the
    true m_c, which we know here (measured within 0.03 over these seeds; tolerance 0.1). The
    debiased ratio is near the true |m|/|u| while the raw half-sample ratio is inflated."""
    data = synthetic(seed, category_structure=True, contrast=1.0, d=64, n=30)
    reliability = split_half_reliability(*data.args(), seed=seed, n_splits=20)
    assert reliability["cos_matched_split_half"] < 0.3
    actual_cosines, true_ratios = [], []
    for category, topic in data.topics.items():
        harmful = data.harmful[[c == category for c in data.harmful_categories]]
        matched = data.matched[[c == category for c in data.matched_categories]]
        estimate = harmful.mean(0) - matched.mean(0)
        actual_cosines.append(
            float(estimate @ data.contrast / (estimate.norm() * data.contrast.norm()))
        )
        true_ratios.append(float(data.contrast.norm() / (topic + data.contrast).norm()))
    actual = sum(actual_cosines) / len(actual_cosines)
    assert reliability["cos_matched_to_truth_estimate"] == pytest.approx(actual, abs=0.1)
    truth = sum(true_ratios) / len(true_ratios)
    assert reliability["norm_ratio_debiased"] == pytest.approx(truth, abs=0.1)
    assert reliability["norm_ratio_half_mean"] > 2 * truth  # noise inflates |m_c|


@pytest.mark.filterwarnings("ignore:categories skipped:RuntimeWarning")
def test_split_half_bookkeeping():
    data = synthetic(7, category_structure=True, categories=3, n=5, d=6)
    # c2 keeps a single matched prompt: it cannot be split
    keep = [i for i, c in enumerate(data.matched_categories) if c != "c2"] + [
        data.matched_categories.index("c2")
    ]
    matched_categories = [data.matched_categories[i] for i in keep]
    with pytest.warns(RuntimeWarning, match="c2"):
        reliability = split_half_reliability(
            data.harmful,
            data.harmful_categories,
            data.matched[keep],
            matched_categories,
            data.generic.mean(0),  # a precomputed mean: used as is by both halves
            seed=11,
            n_splits=3,
        )
    assert reliability["categories"] == ["c0", "c1"]
    assert reliability["skipped_categories"] == {"c2": "fewer than 2 prompts on a side"}
    assert reliability["generic_split"] is False
    assert reliability["per_category"]["c0"]["n_harmful"] == 5
    assert reliability["n_splits"] == 3 and reliability["seed"] == 11
    again = split_half_reliability(
        data.harmful,
        data.harmful_categories,
        data.matched[keep],
        matched_categories,
        data.generic.mean(0),
        seed=11,
        n_splits=3,
    )
    assert again["per_category"] == reliability["per_category"]
    with pytest.raises(ValueError, match="n_splits"):
        split_half_reliability(*data.args(), seed=0, n_splits=0)


# ---------------------------------------------------------------- behavioural capture


@pytest.mark.filterwarnings("ignore:categories skipped:RuntimeWarning")
def test_behavioural_capture_matches_hand_computation():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    directions = torch.stack([2.0 * e1])  # span{e_1}; scale does not matter
    refused = torch.stack([3 * e1 + 4 * e2, e1, 5 * e3])
    refused_categories = ["a", "b", "c"]
    answered = torch.stack([torch.zeros(3), torch.zeros(3), e1, e1 + e2])
    answered_categories = ["a", "b", "b", "d"]
    with pytest.warns(RuntimeWarning, match="left out"):  # the pair (e_1, e_1) of b has x = 0
        capture = compute_behavioural_capture(
            directions, refused, refused_categories, answered, answered_categories
        )
    # a: x = 3 e1 + 4 e2 -> |P x| / |x| = 3/5
    # b: (e1 - 0) -> 1; (e1 - e1) = 0 -> left out
    # c, d: no partner (skipped)
    assert capture["per_category"]["a"] == {
        "capture": pytest.approx(0.6),
        "n_pairs": 1,
        "n_refused": 1,
        "n_answered": 1,
    }
    assert capture["per_category"]["b"]["capture"] == pytest.approx(1.0)
    assert capture["per_category"]["b"]["n_pairs"] == 1
    assert capture["n_pairs"] == 2
    assert capture["capture"] == pytest.approx((0.6 + 1.0) / 2)
    assert capture["capture_category_mean"] == pytest.approx((0.6 + 1.0) / 2)
    assert capture["skipped_categories"] == {
        "c": "no answered matched prompt",
        "d": "no refused harmful prompt",
    }


def test_behavioural_capture_uses_every_pair_and_agrees_with_compute_capture():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(2, 10, generator=generator)
    refused = torch.randn(5, 10, generator=generator)
    answered = torch.randn(3, 10, generator=generator)
    refused_categories = ["x", "x", "x", "y", "y"]
    answered_categories = ["x", "y", "y"]
    capture = compute_behavioural_capture(
        directions, refused, refused_categories, answered, answered_categories
    )
    assert capture["n_pairs"] == 3 * 1 + 2 * 2
    # with one refused and one answered prompt per category the pairs are compute_capture's
    one_each = compute_behavioural_capture(
        directions, refused[[0, 3]], ["x", "y"], answered[:2], ["x", "y"]
    )
    assert one_each["capture"] == pytest.approx(
        compute_capture(directions, refused[[0, 3]], ["x", "y"], answered[:2], ["x", "y"]),
        rel=1e-12,
    )
    # the full span captures everything
    full = compute_behavioural_capture(
        torch.eye(10), refused, refused_categories, answered, answered_categories
    )
    assert full["capture"] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:categories skipped:RuntimeWarning")
def test_behavioural_capture_degenerate_inputs():
    refused = torch.ones(2, 4)
    answered = torch.zeros(1, 4)
    with pytest.warns(RuntimeWarning, match="capture is 0"):
        capture = compute_behavioural_capture(
            torch.zeros(1, 4), refused, ["a", "a"], answered, ["a"]
        )
    assert capture["capture"] == 0.0
    with pytest.warns(RuntimeWarning, match="NaN"):
        capture = compute_behavioural_capture(
            torch.ones(1, 4), refused, ["a", "a"], answered, ["b"]
        )
    assert math.isnan(capture["capture"]) and capture["n_pairs"] == 0
    with pytest.raises(ValueError, match="one category per row"):
        compute_behavioural_capture(torch.ones(1, 4), refused, ["a"], answered, ["a"])
