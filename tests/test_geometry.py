"""Contrast geometry, cosines, capture and perturbation against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from abliterate.geometry import (
    compute_capture,
    compute_contrast_geometry,
    compute_cosine_to_diff_in_means,
    compute_direction_cosines,
    compute_perturbation_ratio,
)


def _around(mean: torch.Tensor, n: int = 4, spread: float = 0.5, seed: int = 0) -> torch.Tensor:
    """n points whose mean is exactly ``mean`` (symmetric +-e pairs)."""
    generator = torch.Generator().manual_seed(seed)
    half = spread * torch.randn(n // 2, mean.shape[0], generator=generator, dtype=torch.float64)
    return torch.cat([mean + half, mean - half])


def _constructed():
    """G = generic mean; per category t_c (topic) and m_c (matched contrast) are planted."""
    generic = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    topic = {
        "hacking": torch.tensor([4.0, 0.0, 0.0, 0.0]),
        "drugs": torch.tensor([0.0, 3.0, 0.0, 0.0]),
    }
    contrast = {
        "hacking": torch.tensor([0.0, 0.0, 1.0, 0.0]),
        "drugs": torch.tensor([0.0, 0.0, 0.0, 0.5]),
    }
    harmful, categories, matched, matched_categories = [], [], [], []
    for seed, category in enumerate(topic):
        matched.append(_around(generic + topic[category], seed=seed))
        matched_categories += [category] * 4
        harmful.append(_around(generic + topic[category] + contrast[category], seed=10 + seed))
        categories += [category] * 4
    unmatched = _around(generic, n=6, seed=99)
    return (
        torch.cat(harmful),
        categories,
        torch.cat(matched),
        matched_categories,
        unmatched,
        topic,
        contrast,
    )


def test_contrast_geometry_matches_hand_computation():
    harmful, categories, matched, matched_categories, unmatched, topic, contrast = _constructed()
    geometry = compute_contrast_geometry(
        harmful, categories, matched, matched_categories, unmatched
    )
    ratios, cos_m, cos_t = [], [], []
    for category in ("hacking", "drugs"):
        t, m = topic[category].double(), contrast[category].double()
        u = t + m
        row = geometry["per_category"][category]
        assert row["norm_unmatched"] == pytest.approx(u.norm().item())
        assert row["norm_matched"] == pytest.approx(m.norm().item())
        assert row["norm_topic"] == pytest.approx(t.norm().item())
        ratios.append(m.norm().item() / u.norm().item())
        cos_m.append(float(m @ u) / (m.norm() * u.norm()).item())
        cos_t.append(float(t @ u) / (t.norm() * u.norm()).item())
        assert row["norm_ratio_matched_to_unmatched"] == pytest.approx(ratios[-1])
        assert row["cos_matched_unmatched"] == pytest.approx(cos_m[-1])
        assert row["cos_topic_unmatched"] == pytest.approx(cos_t[-1])
    # hacking: |m|=1, |u|=sqrt(17): ratio 1/sqrt(17), cos(m,u) = 1/sqrt(17), cos(t,u) = 4/sqrt(17).
    assert ratios[0] == pytest.approx(1 / math.sqrt(17))
    assert cos_t[0] == pytest.approx(4 / math.sqrt(17))
    assert geometry["norm_ratio_matched_to_unmatched"] == pytest.approx(sum(ratios) / 2)
    assert geometry["cos_matched_unmatched"] == pytest.approx(sum(cos_m) / 2)
    assert geometry["cos_topic_unmatched"] == pytest.approx(sum(cos_t) / 2)
    assert geometry["skipped_categories"] == {}


def test_contrast_geometry_skips_and_lists_one_sided_categories():
    harmful, categories, matched, matched_categories, unmatched, *_ = _constructed()
    extra = torch.zeros(2, 4, dtype=torch.float64)
    harmful = torch.cat([harmful, extra])
    categories = [*categories, "fraud", "fraud"]
    matched = torch.cat([matched, extra])
    matched_categories = [*matched_categories, "harassment", "harassment"]
    with pytest.warns(RuntimeWarning, match="skipped"):
        geometry = compute_contrast_geometry(
            harmful, categories, matched, matched_categories, unmatched
        )
    assert geometry["categories"] == ["hacking", "drugs"]
    assert geometry["skipped_categories"] == {
        "fraud": "no matched prompts",
        "harassment": "no harmful prompts",
    }


def test_zero_contrast_gives_nan_with_a_warning_not_a_crash():
    generic = torch.ones(2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning):
        geometry = compute_contrast_geometry(generic, ["a", "a"], generic, ["a", "a"], generic)
    assert math.isnan(geometry["norm_ratio_matched_to_unmatched"])
    assert math.isnan(geometry["per_category"]["a"]["cos_topic_unmatched"])


def test_direction_cosines_and_zero_rows():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    with pytest.warns(RuntimeWarning):
        cosines = compute_direction_cosines(vectors)
    assert cosines[0][0] == pytest.approx(1.0)
    assert cosines[0][1] == pytest.approx(1 / math.sqrt(2))
    assert cosines[1][0] == pytest.approx(cosines[0][1])
    assert all(math.isnan(c) for c in cosines[2]) and math.isnan(cosines[0][2])


def test_cosine_to_diff_in_means():
    harmful = torch.tensor([[2.0, 1.0], [2.0, 3.0]])  # mean (2, 2)
    unmatched = torch.tensor([[0.0, 2.0], [0.0, 2.0]])  # mean (0, 2): difference (2, 0)
    cosines = compute_cosine_to_diff_in_means(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]), harmful, unmatched
    )
    assert cosines == pytest.approx([1.0, 0.0, -1 / math.sqrt(2)])


def test_capture_is_one_in_span_zero_orthogonal_and_the_norm_fraction_between():
    d = 6
    eye = torch.eye(d, dtype=torch.float64)
    directions = torch.stack([eye[0] + eye[1], eye[1], torch.zeros(d)])  # span{e0, e1}; a zero row
    matched = torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    categories = ["a", "a", "b", "b"]

    in_span = matched + torch.stack([eye[0] * 2, eye[1], eye[0] - eye[1], eye[1] * 3])
    assert compute_capture(directions, in_span, categories, matched, categories) == pytest.approx(
        1.0
    )

    orthogonal = matched + torch.stack([eye[2], eye[3] * 2, eye[4], eye[5]])
    assert compute_capture(
        directions, orthogonal, categories, matched, categories
    ) == pytest.approx(0.0, abs=1e-12)

    half = matched + torch.stack([eye[0] + eye[2]] * 4)  # |P x| / |x| = 1 / sqrt(2)
    assert compute_capture(directions, half, categories, matched, categories) == pytest.approx(
        1 / math.sqrt(2)
    )


def test_capture_pairs_within_category():
    d = 3
    eye = torch.eye(d, dtype=torch.float64)
    # Harmful "a" rows differ from matched "a" rows along e0 only; across categories they would
    # differ along e1 too, so pairing across categories would lower the capture.
    matched = torch.stack([10 * eye[1], torch.zeros(d)])
    harmful = torch.stack([torch.zeros(d) + eye[0], 10 * eye[1] + eye[0]])
    capture = compute_capture(eye[:1], harmful, ["b", "a"], matched, ["a", "b"])
    assert capture == pytest.approx(1.0)


def test_perturbation_ratio_hand_computation():
    original = torch.zeros(2, 3, 2, dtype=torch.float64)
    original[:, 1] = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # steps from layer 0: 5 and 2
    original[:, 2] = original[:, 1] + torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ablated = original.clone()
    ablated[:, 1] += torch.tensor([[0.6, 0.8], [0.0, 0.4]])  # changes 1.0 and 0.4
    assert compute_perturbation_ratio(original, ablated, 1) == pytest.approx(0.7 / 3.5)
    # Layer 0: the denominator is the layer's own mean norm.
    original[:, 0] = torch.tensor([[0.0, 2.0], [0.0, 4.0]])
    ablated[:, 0] = original[:, 0] + torch.tensor([[0.3, 0.0], [0.0, 0.3]])
    assert compute_perturbation_ratio(original, ablated, 0) == pytest.approx(0.3 / 3.0)
    assert compute_perturbation_ratio(original, ablated, -2) == pytest.approx(
        compute_perturbation_ratio(original, ablated, 1)
    )


def test_perturbation_ratio_without_natural_change_is_nan():
    original = torch.ones(2, 2, 3)
    ablated = original + 1
    with pytest.warns(RuntimeWarning):
        assert math.isnan(compute_perturbation_ratio(original, ablated, 1))


def test_trial_geometry_reports_nulls_and_behavioural_capture():
    """The trial's geometry block: contrast statistics with their split-half and shuffled nulls,
    and capture on held-out pairs chosen by behaviour (refused harmful vs answered matched)."""
    from abliterate.geometry import (
        HeldOutActivations,
        LayerActivations,
        compute_contrast_geometry,
        compute_trial_geometry,
    )

    generator = torch.Generator().manual_seed(0)
    d, categories = 16, ["a", "b", "c"]
    refusal = torch.zeros(d)
    refusal[0] = 5.0
    topics = {c: torch.randn(d, generator=generator) * 3 for c in categories}

    def rows(kind: str, n: int) -> tuple[torch.Tensor, list[str]]:
        values, labels = [], []
        for c in categories:
            shift = topics[c] + (refusal if kind == "harmful" else 0)
            values.append(shift + 0.1 * torch.randn(n, d, generator=generator))
            labels += [c] * n
        return torch.cat(values), labels

    harmful, harmful_categories = rows("harmful", 8)
    matched, matched_categories = rows("matched", 8)
    unmatched = 0.1 * torch.randn(20, d, generator=generator)
    train = LayerActivations(harmful, harmful_categories, matched, matched_categories, unmatched)
    eval_harmful, eval_harmful_categories = rows("harmful", 2)
    eval_matched, eval_matched_categories = rows("matched", 2)
    held_out = HeldOutActivations(
        eval_harmful,
        eval_harmful_categories,
        ["REFUSE", "COMPLY"] * 3,  # one refused prompt per category
        eval_matched,
        eval_matched_categories,
        ["COMPLY", "REFUSE"] * 3,  # one answered matched prompt per category
    )
    vectors = refusal[None] / 5.0
    geometry = compute_trial_geometry(train, vectors, seed=0, held_out=held_out)
    real = compute_contrast_geometry(harmful, harmful_categories, matched, matched_categories,
                                     unmatched)  # fmt: skip
    assert geometry["norm_ratio_matched_to_unmatched"] == real["norm_ratio_matched_to_unmatched"]
    assert geometry["shuffled_null"]["norm_ratio_matched_to_unmatched"] == pytest.approx(
        real["norm_ratio_matched_to_unmatched"]
    )
    assert "norm_ratio_matched_to_unmatched_null_mean" in geometry["shuffled_null"]
    assert geometry["split_half"]["cos_matched_split_half"] > 0.9  # a clean refusal signal
    # 3 categories x 1 refused x 1 answered; the pair difference is almost all refusal direction
    assert geometry["behavioural_capture_pairs"] == 3
    assert geometry["behavioural_capture"] > 0.9
