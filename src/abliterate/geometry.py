"""Geometry that explains why a contrast baseline works or fails (method.md, Geometry).

Per layer and harm category c, with G the generic harmless mean:
    u_c = mean(harmful_c) - G                    (unmatched contrast)
    m_c = mean(harmful_c) - mean(matched_c)      (matched contrast)
    t_c = mean(matched_c) - G                    (the topic component), so u_c = m_c + t_c.
Petrov's finding is |m_c| / |u_c| ~ 0.1: subtracting a same-topic mean cancels the topic part
and leaves a much smaller direction.

Every function takes plain activations at one layer, reduces in float64 and returns Python
floats. A quantity that is undefined (a zero-norm vector, an empty set) is NaN with a
RuntimeWarning, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
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
    norms = differences.norm(dim=1)  # (pairs,)
    usable = torch.isfinite(norms) & (norms > 0)
    if not bool(usable.any()):
        _warn("no harmful/matched pair with a non-zero finite difference; capture is NaN")
        return math.nan
    if len(basis) == 0:
        _warn("no non-zero direction to capture with; capture is 0")
        return 0.0
    projected = (differences[usable] @ basis.T).norm(dim=1)  # |P x| = |B x|, B orthonormal rows
    return float((projected / norms[usable]).mean())


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
