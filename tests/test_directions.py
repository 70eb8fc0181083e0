"""Direction extraction on synthetic activations with planted structure (seeded, CPU, fast)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from abliterate.config import ExtractionConfig
from abliterate.directions import (
    Directions,
    compute_differences,
    extract_directions,
    load_directions,
    relative_scales,
    save_directions,
    unit_directions,
)

D_MODEL = 32
CATEGORIES = ("hacking", "drugs", "fraud")


def _cfg(**overrides) -> ExtractionConfig:
    # Few iterations: the planted clusters are tight, so the SOM needs little training here.
    return replace(ExtractionConfig(iterations=200, seed=0), **overrides)


def _planted(per_category: int = 12, seed: int = 0, noise: float = 0.05):
    """Harmful h = generic mean + offset_c + noise; matched means differ per category.

    Returns (harmful, categories, unmatched_mean, matched_means, offsets).
    """
    generator = torch.Generator().manual_seed(seed)
    unmatched_mean = torch.randn(D_MODEL, generator=generator, dtype=torch.float64) * 3
    offsets = {
        c: torch.randn(D_MODEL, generator=generator, dtype=torch.float64) for c in CATEGORIES
    }
    matched_means = {
        c: unmatched_mean + torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
        for c in CATEGORIES
    }
    rows, categories = [], []
    for category in CATEGORIES:
        for _ in range(per_category):
            jitter = noise * torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
            rows.append(unmatched_mean + offsets[category] + jitter)
            categories.append(category)
    harmful = torch.stack(rows).float()  # (n, d_model)
    return harmful, categories, unmatched_mean, matched_means, offsets


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


# --- differences ------------------------------------------------------------------------------


def test_unmatched_differences_subtract_the_generic_mean():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    diffs = compute_differences(harmful, categories, "unmatched", unmatched_mean, matched_means)
    assert diffs.dtype == torch.float32 and diffs.shape == harmful.shape
    torch.testing.assert_close(diffs, (harmful.double() - unmatched_mean).float(), rtol=0, atol=0)


def test_matched_differences_use_each_prompts_own_category_mean():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    diffs = compute_differences(harmful, categories, "matched", unmatched_mean, matched_means)
    for i, category in enumerate(categories):
        expected = (harmful[i].double() - matched_means[category]).float()
        torch.testing.assert_close(diffs[i], expected, rtol=0, atol=0)
    # The categories' matched means really differ, so a wrong mean would be caught.
    assert not torch.allclose(matched_means["hacking"], matched_means["drugs"])


def test_missing_matched_category_is_named():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    del matched_means["fraud"]
    with pytest.raises(ValueError, match=r"fraud.*drugs.*hacking"):
        compute_differences(harmful, categories, "matched", unmatched_mean, matched_means)
    with pytest.raises(ValueError, match="fraud"):
        extract_directions(
            harmful, categories, "matched", unmatched_mean, matched_means, _cfg(), layer=3
        )


def test_unknown_baseline_is_rejected():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    with pytest.raises(ValueError, match="baseline"):
        compute_differences(harmful, categories, "topic", unmatched_mean, matched_means)


# --- som_per_class ----------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["unmatched", "matched"])
def test_som_per_class_recovers_one_planted_direction_per_category(baseline):
    harmful, categories, unmatched_mean, matched_means, offsets = _planted()
    directions = extract_directions(
        harmful, categories, baseline, unmatched_mean, matched_means, _cfg(), layer=5
    )
    assert directions.labels == list(CATEGORIES)
    assert directions.vectors.shape == (3, D_MODEL) and directions.vectors.dtype == torch.float32
    assert directions.layer == 5 and directions.degenerate == 0
    assert directions.info["samples_per_category"] == dict.fromkeys(CATEGORIES, 12)
    for vector, category, wins, norm in zip(
        directions.vectors, CATEGORIES, directions.win_counts, directions.norms, strict=True
    ):
        # The planted difference to this baseline: offset_c (+ generic - matched mean).
        planted = offsets[category] + (
            unmatched_mean - matched_means[category] if baseline == "matched" else 0
        )
        assert _cos(vector, planted) > 0.9
        assert 1 <= wins <= 12
        assert norm == pytest.approx(vector.double().norm().item(), rel=1e-6)


def test_som_per_class_records_empty_categories_instead_of_crashing():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    directions = extract_directions(
        harmful,
        categories,
        "unmatched",
        unmatched_mean,
        matched_means,
        _cfg(),
        layer=0,
        expected_categories=["self_harm", *CATEGORIES],
    )
    assert directions.labels == list(CATEGORIES)
    assert directions.info["empty_categories"] == ["self_harm"]
    assert directions.degenerate == 0


def test_category_at_the_baseline_is_degenerate_and_dropped():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    # Exactly representable in float32, so h - mean is exactly zero for these rows.
    unmatched_mean = unmatched_mean.float().double()
    zero_rows = [i for i, c in enumerate(categories) if c == "drugs"]
    harmful[zero_rows] = unmatched_mean.float()
    with pytest.warns(RuntimeWarning, match="drugs"):
        directions = extract_directions(
            harmful, categories, "unmatched", unmatched_mean, matched_means, _cfg(), layer=1
        )
    assert directions.labels == ["hacking", "fraud"]
    assert directions.degenerate == 1
    assert directions.info["degenerate_labels"] == ["drugs"]
    assert all(math.isfinite(n) and n > 0 for n in directions.norms)


def test_nonfinite_rows_are_left_out_and_counted():
    harmful, categories, unmatched_mean, matched_means, offsets = _planted()
    harmful[0, 0] = math.nan
    directions = extract_directions(
        harmful, categories, "unmatched", unmatched_mean, matched_means, _cfg(), layer=1
    )
    assert directions.info["nonfinite_rows"] == 1
    assert torch.isfinite(directions.vectors).all()
    assert _cos(directions.vectors[0], offsets["hacking"]) > 0.9


# --- diff_in_means ----------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["unmatched", "matched"])
def test_diff_in_means_is_the_float64_mean_difference(baseline):
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    directions = extract_directions(
        harmful,
        categories,
        baseline,
        unmatched_mean,
        matched_means,
        _cfg(method="diff_in_means"),
        layer=2,
    )
    base = (
        unmatched_mean.expand(len(categories), D_MODEL)
        if baseline == "unmatched"
        else torch.stack([matched_means[c] for c in categories])
    )
    expected = (harmful.double() - base).mean(dim=0)  # (d_model,) float64
    assert directions.labels == ["diff_in_means"] and directions.win_counts is None
    torch.testing.assert_close(directions.vectors[0], expected.float(), rtol=0, atol=0)
    assert directions.norms[0] == pytest.approx(expected.norm().item(), rel=1e-12)


# --- som_global -------------------------------------------------------------------------------


def _two_clusters(sizes=(15, 10)):
    """Identical points per cluster, one category each: neurons initialised on the same point
    stay identical, ties go to the lowest index, so some neurons never win."""
    generator = torch.Generator().manual_seed(1)
    centers = torch.randn(2, D_MODEL, generator=generator, dtype=torch.float64) * 5
    harmful = torch.cat([centers[j].expand(n, D_MODEL) for j, n in enumerate(sizes)]).float()
    categories = ["hacking"] * sizes[0] + ["drugs"] * sizes[1]
    unmatched_mean = torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    matched_means = {
        c: torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
        for c in ("hacking", "drugs")
    }
    return harmful, categories, unmatched_mean, matched_means, centers


def test_som_global_drops_never_winning_neurons_and_sorts_by_wins():
    harmful, categories, unmatched_mean, matched_means, _ = _two_clusters()
    cfg = _cfg(method="som_global")
    directions = extract_directions(
        harmful, categories, "unmatched", unmatched_mean, matched_means, cfg, layer=4
    )
    wins = directions.win_counts
    assert wins is not None and all(w > 0 for w in wins)
    assert wins == sorted(wins, reverse=True)
    assert sum(wins) == len(categories)
    assert directions.count < cfg.som_rows * cfg.som_cols
    assert directions.info["never_won"] == cfg.som_rows * cfg.som_cols - directions.count
    assert all(label.startswith("som_neuron_") for label in directions.labels)

    top = extract_directions(
        harmful,
        categories,
        "unmatched",
        unmatched_mean,
        matched_means,
        _cfg(method="som_global", top_k=1),
        layer=4,
    )
    assert top.count == 1 and top.win_counts == wins[:1]
    torch.testing.assert_close(top.vectors, directions.vectors[:1])


def test_som_global_matched_subtracts_the_majority_categorys_matched_mean():
    harmful, categories, unmatched_mean, matched_means, centers = _two_clusters()
    directions = extract_directions(
        harmful,
        categories,
        "matched",
        unmatched_mean,
        matched_means,
        _cfg(method="som_global"),
        layer=4,
    )
    neuron_category = directions.info["neuron_baseline_category"]
    assert set(neuron_category) == set(directions.labels)
    for vector, label in zip(directions.vectors, directions.labels, strict=True):
        category = neuron_category[label]
        center = centers[0] if category == "hacking" else centers[1]
        # weight = vector + matched mean sits on (or next to) its cluster's point.
        weight = vector.double() + matched_means[category]
        assert _cos(weight, center) > 0.99


# --- SVD --------------------------------------------------------------------------------------


def test_svd_directions_are_orthonormal_ordered_and_oriented():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    raw = extract_directions(
        harmful, categories, "unmatched", unmatched_mean, matched_means, _cfg(), layer=0
    )
    svd = extract_directions(
        harmful,
        categories,
        "unmatched",
        unmatched_mean,
        matched_means,
        _cfg(orthogonalize="svd"),
        layer=0,
    )
    q = svd.vectors.double()
    assert svd.labels == ["svd_0", "svd_1", "svd_2"] and svd.win_counts is None
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    singular_values = torch.linalg.svdvals(raw.vectors.double())
    torch.testing.assert_close(
        torch.tensor(svd.info["singular_values"], dtype=torch.float64),
        singular_values,
        rtol=1e-5,
        atol=0,
    )
    assert svd.norms == sorted(svd.norms, reverse=True)
    assert svd.norms == pytest.approx((singular_values / math.sqrt(3)).tolist(), rel=1e-5)
    # Sign convention: every axis points along the sum of the raw directions.
    assert ((q @ raw.vectors.double().sum(dim=0)) >= 0).all()


def test_svd_top_k_and_fewer_than_asked():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    top2 = extract_directions(
        harmful,
        categories,
        "unmatched",
        unmatched_mean,
        matched_means,
        _cfg(orthogonalize="svd", top_k=2),
        layer=0,
    )
    assert top2.count == 2 and top2.info["svd_kept"] == 2
    assert "svd_fewer_than_top_k" not in top2.info

    top5 = extract_directions(
        harmful,
        categories,
        "unmatched",
        unmatched_mean,
        matched_means,
        _cfg(orthogonalize="svd", top_k=5),
        layer=0,
    )
    assert top5.count == 3
    assert top5.info["svd_fewer_than_top_k"] is True and top5.info["svd_requested_top_k"] == 5


def test_svd_of_one_diff_in_means_direction_is_its_unit_vector():
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    kwargs = dict(unmatched_mean=unmatched_mean, matched_means=matched_means, layer=0)
    raw = extract_directions(
        harmful, categories, "unmatched", cfg=_cfg(method="diff_in_means"), **kwargs
    )
    svd = extract_directions(
        harmful,
        categories,
        "unmatched",
        cfg=_cfg(method="diff_in_means", orthogonalize="svd"),
        **kwargs,
    )
    torch.testing.assert_close(svd.vectors, unit_directions(raw), atol=1e-6, rtol=0)
    assert svd.norms == pytest.approx(raw.norms, rel=1e-6)


def test_svd_drops_axes_in_the_null_space():
    harmful, categories, unmatched_mean, matched_means, offsets = _planted(noise=0.0)
    # Three categories whose offsets span only two dimensions.
    base = unmatched_mean.float().double()
    two_d = {"hacking": offsets["hacking"], "drugs": offsets["drugs"]}
    two_d["fraud"] = offsets["hacking"] + offsets["drugs"]
    harmful = torch.stack([(base + two_d[c]).float() for c in categories])
    directions = extract_directions(
        harmful, categories, "unmatched", base, matched_means, _cfg(orthogonalize="svd"), layer=0
    )
    assert directions.count == 2 and directions.info["svd_null_dropped"] == 1


# --- ablation helpers and storage -------------------------------------------------------------


def test_unit_directions_and_relative_scales():
    vectors = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    directions = Directions(vectors=vectors, labels=["a", "b"], layer=0, norms=[5.0, 2.0])
    torch.testing.assert_close(unit_directions(directions), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert relative_scales(directions, 10.0) == pytest.approx([0.5, 0.2])
    with pytest.warns(RuntimeWarning):
        assert all(math.isnan(s) for s in relative_scales(directions, 0.0))


def test_save_load_roundtrip(tmp_path):
    harmful, categories, unmatched_mean, matched_means, _ = _planted()
    directions = extract_directions(
        harmful, categories, "matched", unmatched_mean, matched_means, _cfg(), layer=7
    )
    path = tmp_path / "out" / "directions.safetensors"
    save_directions(path, directions, {"model": "tiny", "baseline": "matched"})
    loaded = load_directions(path)
    torch.testing.assert_close(loaded.vectors, directions.vectors, rtol=0, atol=0)
    assert loaded.labels == directions.labels and loaded.layer == 7
    assert loaded.norms == directions.norms and loaded.win_counts == directions.win_counts
    assert loaded.degenerate == directions.degenerate
    assert loaded.info["samples_per_category"] == directions.info["samples_per_category"]
    assert loaded.info["extra_metadata"] == {"model": "tiny", "baseline": "matched"}
    with pytest.raises(ValueError, match="reserved"):
        save_directions(path, directions, {"layer": "3"})


# --- the per-category SOMs, trained side by side ------------------------------------------------


@pytest.mark.filterwarnings("ignore:triangle neighborhood")
@pytest.mark.parametrize("topology", ["hexagonal", "rectangular"])
@pytest.mark.parametrize("neighborhood", ["gaussian", "mexican_hat", "bubble", "triangle"])
def test_lockstep_soms_are_bit_identical_to_one_minisom_per_category(neighborhood, topology):
    """som_per_class trains its maps in lockstep (one numpy call per step for all of them); each
    map must end exactly where MiniSom, trained alone, ends: same seed, same sample order, same
    arithmetic. Unequal category sizes exercise the per-map sample orders."""
    import numpy as np

    from abliterate.som import train_som as _train_som
    from abliterate.som import train_soms_lockstep as _train_soms_lockstep

    sigma = 1.0 if neighborhood in ("bubble", "triangle") else 0.4
    cfg = _cfg(neighborhood=neighborhood, topology=topology, sigma=sigma, iterations=150)
    generator = np.random.default_rng(0)
    datasets = [generator.normal(size=(n, D_MODEL)) for n in (7, 12, 1)]
    expected = [_train_som(data, cfg).get_weights() for data in datasets]
    trained = _train_soms_lockstep(datasets, cfg)
    for alone, together in zip(expected, trained, strict=True):
        assert np.array_equal(alone, together)
