"""Refusal directions at one layer: contrast differences, extraction, SVD, storage.

Notation (method.md, Extraction): ``h_i`` is harmful prompt i's residual activation at the layer,
``d_i = h_i - mean(baseline)`` its difference to the contrast baseline, where the baseline is the
generic harmless pool (``unmatched``) or the topic-matched harmless prompts of the prompt's own
category (``matched``).

Methods:
    som_per_class (Petrov): one MiniSom per category on that category's ``d_i``; the weight of
        the neuron that wins most samples is the category's direction.
    som_global (Piras): one MiniSom on every ``h_i``; each neuron that wins a sample gives
        ``weight - baseline mean``, sorted by win count.
    diff_in_means (Arditi): ``mean_i d_i``.

``orthogonalize="svd"`` then replaces the directions by the right singular vectors of their
stack. Degenerate directions (zero norm or non-finite) are dropped and counted, never raised.
All arithmetic is float64; stored vectors are float32.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors import safe_open

from abliterate.cache import save_safetensors_atomic
from abliterate.config import (
    Baseline,
    ExtractionConfig,
    ExtractionMethod,
    Orthogonalize,
    parse_choice,
)
from abliterate.som import assign_winners, train_som, train_soms_lockstep

# A direction is "zero" when |d| <= ZERO_NORM_RTOL * mean_i |h_i|: scale-free across layers whose
# activation norms differ by orders of magnitude.
ZERO_NORM_RTOL = 1e-8

FORMAT = "abliterate.directions/1"
_RESERVED_METADATA = ("format", "layer", "labels", "norms", "degenerate", "win_counts", "info")


@dataclass
class Directions:
    """The directions extracted at one layer.

    Attributes:
        vectors: (k, d_model) float32. Raw difference vectors (un-normalised), or unit right
            singular vectors after ``orthogonalize="svd"``.
        labels: one per vector: the category name (som_per_class), ``som_neuron_<r>_<c>``
            (som_global), ``diff_in_means``, or ``svd_<i>``.
        layer: 0-based decoder layer the activations came from.
        norms: one per vector: |vector| for raw directions; for SVD directions the RMS magnitude
            of the stacked directions along that axis, ``s_i / sqrt(n_stacked)``.
        degenerate: directions dropped as zero-norm or non-finite.
        win_counts: samples won by each direction's SOM neuron (None for other methods and SVD).
        info: everything else worth recording (JSON-serialisable): method, baseline, sample
            counts per category, SOM quantization errors, singular values, dropped labels.
    """

    vectors: torch.Tensor  # (k, d_model) float32
    labels: list[str]
    layer: int
    norms: list[float]
    degenerate: int = 0
    win_counts: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be (k, d_model), got shape {tuple(self.vectors.shape)}")
        k = self.vectors.shape[0]
        if len(self.labels) != k or len(self.norms) != k:
            raise ValueError(
                f"{k} vectors but {len(self.labels)} labels and {len(self.norms)} norms"
            )
        if self.win_counts is not None and len(self.win_counts) != k:
            raise ValueError(f"{k} vectors but {len(self.win_counts)} win counts")

    @property
    def count(self) -> int:
        return self.vectors.shape[0]

    def as_record(self, relative_scales: Sequence[float] | None = None) -> dict[str, Any]:
        """The results contract's ``directions`` block (``relative_scales``: the per-direction
        scales of ``ablation.direction_norm=relative``, else null)."""
        return {
            "count": self.count,
            "norms": list(self.norms),
            "degenerate": self.degenerate,
            "labels": list(self.labels),
            "win_counts": self.win_counts,
            "relative_scales": list(relative_scales) if relative_scales is not None else None,
        }


# ---------------------------------------------------------------------------------------------
# Differences


def compute_differences(
    harmful: torch.Tensor,
    categories: Sequence[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """Per-prompt contrast differences ``d_i = h_i - mean(baseline)``.

    Args:
        harmful: (n, d_model) harmful activations at one layer.
        categories: n category names, one per harmful prompt.
        baseline: ``unmatched`` (one generic harmless mean) or ``matched`` (the mean of the
            matched harmless prompts of the prompt's own category).
        unmatched_mean: (d_model,) mean of the generic harmless pool; needed for ``unmatched``.
        matched_means: category -> (d_model,) mean of its matched harmless prompts; needed for
            ``matched``.

    Returns:
        (n, d_model) float32, computed in float64.

    Raises:
        ValueError: unknown baseline, bad shapes, or (``matched``) a harmful category without
            matched prompts; the message names it and the categories that have them.
    """
    return _differences64(harmful, categories, baseline, unmatched_mean, matched_means).float()


def _differences64(
    harmful: torch.Tensor,
    categories: Sequence[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    _check_activations(harmful, categories)
    baseline_rows = _baseline_rows(categories, baseline, unmatched_mean, matched_means, harmful)
    return harmful.double() - baseline_rows  # (n, d_model) float64


def _check_activations(harmful: torch.Tensor, categories: Sequence[str]) -> None:
    if harmful.ndim != 2:
        raise ValueError(f"harmful must be (n, d_model), got shape {tuple(harmful.shape)}")
    if len(categories) != harmful.shape[0]:
        raise ValueError(
            f"{harmful.shape[0]} harmful activations but {len(categories)} category names"
        )


def _check_mean(name: str, mean: torch.Tensor, d_model: int) -> None:
    if tuple(mean.shape) != (d_model,):
        raise ValueError(f"{name} must have shape ({d_model},), got {tuple(mean.shape)}")


def _check_matched_coverage(
    categories: Sequence[str], matched_means: Mapping[str, torch.Tensor] | None
) -> None:
    available = sorted(matched_means or {})
    missing = sorted(set(categories) - set(available))
    if missing:
        raise ValueError(
            f"harmful categories {missing} have no matched harmless prompts (baseline=matched); "
            f"categories with matched prompts: {available or 'none'}"
        )


def _baseline_rows(
    categories: Sequence[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
    harmful: torch.Tensor,
) -> torch.Tensor:
    """The baseline mean subtracted from each harmful row: (n, d_model) float64."""
    n, d_model = harmful.shape
    # a plain string from Python; a composed config holds a Baseline already
    if parse_choice(Baseline, baseline, "baseline", ValueError) == Baseline.unmatched:
        if unmatched_mean is None:
            raise ValueError("baseline=unmatched needs unmatched_mean")
        _check_mean("unmatched_mean", unmatched_mean, d_model)
        return unmatched_mean.double().expand(n, d_model)
    _check_matched_coverage(categories, matched_means)
    assert matched_means is not None
    names = list(dict.fromkeys(categories))
    for name in names:
        _check_mean(f"matched_means[{name!r}]", matched_means[name], d_model)
    if not names:
        return torch.zeros(0, d_model, dtype=torch.float64)
    table = torch.stack([matched_means[name].double() for name in names])  # (n_cat, d_model)
    index = torch.tensor([names.index(c) for c in categories], dtype=torch.long)
    return table[index]  # (n, d_model)


# ---------------------------------------------------------------------------------------------
# Extraction


def extract_directions(
    harmful: torch.Tensor,
    categories: Sequence[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
    cfg: ExtractionConfig | DictConfig,
    layer: int,
    expected_categories: Sequence[str] | None = None,
) -> Directions:
    """Extract refusal directions at one layer (method.md, Extraction steps 2-4).

    Args:
        harmful: (n, d_model) harmful activations at ``layer``.
        categories: n category names, one per harmful prompt.
        baseline: ``unmatched`` or ``matched`` (see ``compute_differences``).
        unmatched_mean: (d_model,) float64 mean of the generic harmless pool.
        matched_means: category -> (d_model,) float64 mean of its matched harmless prompts.
        cfg: an ``ExtractionConfig`` (dataclass or DictConfig): method, SOM settings, top_k,
            orthogonalize, seed. ``top_k`` keeps the k most-winning neurons of ``som_global``
            and the k leading axes of ``svd`` (both, in that order, when combined); it does not
            limit ``som_per_class`` without SVD (one direction per category).
        layer: 0-based layer, recorded in the result.
        expected_categories: the categories the run asked for; with ``som_per_class`` these fix
            the order of the directions and the ones without samples are recorded in
            ``info["empty_categories"]``. Default: the categories in order of appearance.

    Returns:
        Directions. A category or neuron whose direction is zero-norm (|d| <= 1e-8 * mean |h|)
        or non-finite is dropped and counted in ``degenerate``; harmful rows that are not finite
        are left out of the fit and counted in ``info["nonfinite_rows"]``.

    Raises:
        ValueError: unknown method / baseline / orthogonalize, bad shapes, or a harmful category
            without matched prompts under ``baseline=matched``.
    """
    cfg = cast(ExtractionConfig, cfg)  # a composed node of the schema reads as one
    # plain strings from Python; a composed config holds enum members already
    method = parse_choice(ExtractionMethod, cfg.method, "extraction.method", ValueError)
    key = "extraction.orthogonalize"
    orthogonalize = parse_choice(Orthogonalize, cfg.orthogonalize, key, ValueError)
    _check_activations(harmful, categories)
    categories = list(categories)
    order = list(dict.fromkeys(list(expected_categories or []) + categories))
    info = _extraction_info(harmful, categories, order, method, baseline, orthogonalize)
    candidates = _extract_candidates(
        harmful, categories, order, baseline, unmatched_mean, matched_means, cfg, info
    )
    kept_candidates = _drop_degenerate(candidates, info["zero_norm_tolerance"], info)
    if method == "som_global" and cfg.top_k is not None:
        info["som_global_top_k"] = cfg.top_k
        info["som_global_available"] = len(kept_candidates)
        kept_candidates = kept_candidates[: cfg.top_k]
    return _assemble_directions(kept_candidates, harmful.shape[1], cfg, layer, info)


def _extraction_info(
    harmful: torch.Tensor,
    categories: list[str],
    order: list[str],
    method: str,
    baseline: str,
    orthogonalize: str,
) -> dict[str, Any]:
    """The record of an extraction's settings and inputs, with the zero-norm tolerance
    ``ZERO_NORM_RTOL * mean |h|`` over the finite harmful rows (0 when there are none)."""
    finite = torch.isfinite(harmful).all(dim=1)  # (n,)
    row_norms = harmful[finite].double().norm(dim=1)  # (n_finite,)
    mean_harmful_norm = row_norms.mean().item() if len(row_norms) else math.nan
    tolerance = ZERO_NORM_RTOL * mean_harmful_norm if math.isfinite(mean_harmful_norm) else 0.0
    return {
        "method": method,
        "baseline": baseline,
        "orthogonalize": orthogonalize,
        "n_harmful": len(categories),
        "samples_per_category": {c: categories.count(c) for c in order},
        "nonfinite_rows": int((~finite).sum()),
        "mean_harmful_norm": mean_harmful_norm,
        "zero_norm_tolerance": tolerance,
    }


def _extract_candidates(
    harmful: torch.Tensor,
    categories: list[str],
    order: list[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
    cfg: ExtractionConfig,
    info: dict[str, Any],
) -> list[_Candidate]:
    """The candidate directions of ``cfg.method``, before degenerate ones are dropped."""
    if cfg.method == "som_global":
        return _extract_som_global(
            harmful, categories, order, baseline, unmatched_mean, matched_means, cfg, info
        )
    differences = _differences64(harmful, categories, baseline, unmatched_mean, matched_means)
    if cfg.method == "som_per_class":
        return _extract_som_per_class(differences, categories, order, cfg, info)
    kept = differences[torch.isfinite(differences).all(dim=1)]  # (n_finite, d_model)
    mean = (
        kept.mean(dim=0)
        if len(kept)
        else torch.full((harmful.shape[1],), math.nan, dtype=torch.float64)
    )  # (d_model,) float64
    return [_Candidate("diff_in_means", mean, None)]


def _assemble_directions(
    kept_candidates: list[_Candidate],
    d_model: int,
    cfg: ExtractionConfig,
    layer: int,
    info: dict[str, Any],
) -> Directions:
    """The kept candidates as ``Directions``: stacked as they are, or their SVD axes under
    ``orthogonalize=svd``."""
    stacked = (
        torch.stack([c.vector for c in kept_candidates])
        if kept_candidates
        else torch.zeros(0, d_model, dtype=torch.float64)
    )  # (k, d_model) float64
    labels = [c.label for c in kept_candidates]
    degenerate = len(info["degenerate_labels"])

    if cfg.orthogonalize == "svd":
        vectors, norms = _orthogonalize_svd(stacked, labels, cfg.top_k, info)
        return Directions(
            vectors=vectors.float(),
            labels=[f"svd_{i}" for i in range(len(norms))],
            layer=layer,
            norms=norms,
            degenerate=degenerate,
            win_counts=None,
            info=info,
        )
    win_counts = (
        None if cfg.method == "diff_in_means" else [int(c.wins or 0) for c in kept_candidates]
    )
    return Directions(
        vectors=stacked.float(),
        labels=labels,
        layer=layer,
        norms=[float(v) for v in stacked.norm(dim=1)],
        degenerate=degenerate,
        win_counts=win_counts,
        info=info,
    )


@dataclass
class _Candidate:
    label: str
    vector: torch.Tensor  # (d_model,) float64
    wins: int | None


def _is_usable(vector: torch.Tensor, tolerance: float) -> bool:
    return bool(torch.isfinite(vector).all()) and vector.norm().item() > tolerance


def _drop_degenerate(
    candidates: list[_Candidate], tolerance: float, info: dict[str, Any]
) -> list[_Candidate]:
    kept = [c for c in candidates if _is_usable(c.vector, tolerance)]
    dropped = [c.label for c in candidates if not _is_usable(c.vector, tolerance)]
    info["degenerate_labels"] = dropped
    if dropped:
        warnings.warn(
            f"dropped degenerate (zero-norm or non-finite) directions: {dropped}",
            RuntimeWarning,
            stacklevel=3,
        )
    return kept


def _extract_som_per_class(
    differences: torch.Tensor,
    categories: list[str],
    order: list[str],
    cfg: ExtractionConfig,
    info: dict[str, Any],
) -> list[_Candidate]:
    d_model = differences.shape[1]
    empty: list[str] = []
    winning_neuron: dict[str, list[int]] = {}
    quantization_error: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {}
    for category in order:
        rows = [i for i, c in enumerate(categories) if c == category]
        if not rows:
            empty.append(category)
            continue
        rows_diff = differences[rows]  # (n_c, d_model) float64
        samples[category] = rows_diff[torch.isfinite(rows_diff).all(dim=1)].numpy()
    trainable = [category for category, data in samples.items() if len(data)]
    trained = dict(
        zip(
            trainable,
            train_soms_lockstep([samples[c] for c in trainable], cfg) if trainable else [],
            strict=True,
        )
    )
    candidates = []
    for category, data in samples.items():
        if category not in trained:
            candidates.append(
                _Candidate(category, torch.full((d_model,), math.nan, dtype=torch.float64), 0)
            )
            continue
        weights = trained[category].reshape(-1, d_model)  # (rows*cols, d)
        winners, distances = assign_winners(weights, data)
        wins = np.bincount(winners, minlength=len(weights))
        best = int(np.argmax(wins))  # first maximum: ties go to the lowest neuron index
        winning_neuron[category] = list(divmod(best, cfg.som_cols))
        quantization_error[category] = float(distances.mean())
        candidates.append(
            _Candidate(category, torch.from_numpy(weights[best].copy()), int(wins[best]))
        )
    info["empty_categories"] = empty
    info["winning_neuron"] = winning_neuron
    info["quantization_error"] = quantization_error
    return candidates


def _extract_som_global(
    harmful: torch.Tensor,
    categories: list[str],
    order: list[str],
    baseline: str,
    unmatched_mean: torch.Tensor | None,
    matched_means: Mapping[str, torch.Tensor] | None,
    cfg: ExtractionConfig,
    info: dict[str, Any],
) -> list[_Candidate]:
    """Piras: SOM over the harmful activations themselves, then neuron weight - baseline mean.

    Under ``baseline=matched`` a neuron's baseline is the matched mean of the category most
    represented among the samples it wins (ties: the category seen first), so every direction
    is still a harmful-minus-same-topic contrast.
    """
    d_model = harmful.shape[1]
    # Validates the baseline and its shapes, same rules and messages as compute_differences.
    _baseline_rows(categories, baseline, unmatched_mean, matched_means, harmful)
    finite = torch.isfinite(harmful).all(dim=1)
    data = harmful[finite].double().numpy()  # (n_finite, d_model)
    kept_categories = [c for c, ok in zip(categories, finite.tolist(), strict=True) if ok]
    if len(data) == 0:
        info["never_won"] = cfg.som_rows * cfg.som_cols
        return []
    weights = train_som(data, cfg).get_weights().reshape(-1, d_model)  # (rows*cols, d)
    winners, distances = assign_winners(weights, data)
    wins = np.bincount(winners, minlength=len(weights))
    info["quantization_error"] = float(distances.mean())
    info["never_won"] = int((wins == 0).sum())
    # Most wins first; equal counts keep the lower neuron index first.
    ranked = sorted((j for j in range(len(weights)) if wins[j] > 0), key=lambda j: (-wins[j], j))
    neuron_category: dict[str, str] = {}
    candidates = []
    for j in ranked:
        r, c = divmod(j, cfg.som_cols)
        label = f"som_neuron_{r}_{c}"
        if baseline == "unmatched":
            assert unmatched_mean is not None
            base = unmatched_mean.double()
        else:
            assert matched_means is not None
            won = Counter(kept_categories[i] for i in np.flatnonzero(winners == j))
            majority = max(won, key=lambda name: (won[name], -order.index(name)))
            neuron_category[label] = majority
            base = matched_means[majority].double()
        candidates.append(
            _Candidate(label, torch.from_numpy(weights[j].copy()) - base, int(wins[j]))
        )
    if baseline == "matched":
        info["neuron_baseline_category"] = neuron_category
    return candidates


def _orthogonalize_svd(
    stacked: torch.Tensor, labels: list[str], top_k: int | None, info: dict[str, Any]
) -> tuple[torch.Tensor, list[float]]:
    """Right singular vectors of the stacked directions, by singular value, as unit vectors.

    With D = U S V^T ((k, d) = (k, r)(r, r)(r, d)), row i of V^T is the i-th axis and
    ``s_i / sqrt(k) = sqrt(mean_j (v_i . d_j)^2)`` the RMS magnitude of the directions along it,
    which is what ``norms`` records. Axes in the numerical null space (s_i <= s_0 max(k, d)
    eps_float32; the directions come from float32 activations) carry no direction and are
    dropped. Signs are fixed so that each axis points along the directions' sum
    (``v_i . sum_j d_j >= 0``): SVD signs are arbitrary, and ablation combines and cosines
    depend on them.
    """
    k, d_model = stacked.shape
    info["svd_input_labels"] = list(labels)
    info["svd_input_norms"] = [float(v) for v in stacked.norm(dim=1)]
    info["svd_requested_top_k"] = top_k
    if k == 0:
        info["singular_values"] = []
        info["svd_null_dropped"] = 0
        info["svd_kept"] = 0
        if top_k is not None:
            info["svd_fewer_than_top_k"] = True
        return torch.zeros(0, d_model, dtype=torch.float64), []
    _, singular_values, vh = torch.linalg.svd(stacked, full_matrices=False)  # (r,), (r, d)
    rank_tolerance = singular_values[0].item() * max(k, d_model) * torch.finfo(torch.float32).eps
    rank = int((singular_values > rank_tolerance).sum())
    keep = rank if top_k is None else min(rank, top_k)
    axes = vh[:keep]  # (keep, d_model)
    signs = torch.sign(axes @ stacked.sum(dim=0))  # (keep,)
    signs[signs == 0] = 1.0
    axes = axes * signs[:, None]
    info["singular_values"] = [float(s) for s in singular_values]
    info["svd_null_dropped"] = len(singular_values) - rank
    info["svd_kept"] = keep
    if top_k is not None and keep < top_k:
        info["svd_fewer_than_top_k"] = True
    norms = [float(s) / math.sqrt(k) for s in singular_values[:keep]]
    return axes, norms


# ---------------------------------------------------------------------------------------------
# For the ablation step


def unit_directions(directions: Directions) -> torch.Tensor:
    """The directions scaled to unit norm: (k, d_model) float32 (zero rows stay zero)."""
    vectors = directions.vectors.double()  # (k, d_model)
    norms = vectors.norm(dim=1, keepdim=True)  # (k, 1)
    zero = (norms == 0).squeeze(1)
    if bool(zero.any()):
        warnings.warn(
            f"{int(zero.sum())} zero direction(s) cannot be normalised; left as zero",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.where(norms > 0, vectors / norms.clamp_min(1e-300), 0.0).float()


def relative_scales(directions: Directions, mean_activation_norm: float) -> list[float]:
    """|d_i| / mean activation norm at the layer, for ``direction_norm=relative``.

    For SVD directions |d_i| is the recorded RMS magnitude ``s_i / sqrt(n_stacked)``.
    A non-positive or non-finite ``mean_activation_norm`` gives NaN scales with a warning.
    """
    if not math.isfinite(mean_activation_norm) or mean_activation_norm <= 0:
        warnings.warn(
            f"mean activation norm {mean_activation_norm!r} is not positive and finite; "
            "relative scales are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return [math.nan] * directions.count
    return [float(norm) / float(mean_activation_norm) for norm in directions.norms]


# ---------------------------------------------------------------------------------------------
# Storage


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_directions(
    path: str | Path, directions: Directions, extra_metadata: Mapping[str, str] | None = None
) -> None:
    """Write the directions to safetensors (tensor ``vectors``), atomically and fsynced.

    Metadata: ``layer``, ``labels`` (JSON; the category names for som_per_class), ``norms``
    (JSON), ``degenerate``, ``win_counts`` (JSON), ``info`` (JSON), plus ``extra_metadata``
    (e.g. model, baseline, method), whose keys must not clash with these.

    Raises:
        ValueError: an extra key is reserved or a value is not a string.
    """
    extra = dict(extra_metadata or {})
    clashes = sorted(set(extra) & set(_RESERVED_METADATA))
    if clashes:
        raise ValueError(f"extra_metadata keys {clashes} are reserved ({_RESERVED_METADATA})")
    not_strings = sorted(k for k, v in extra.items() if not isinstance(v, str))
    if not_strings:
        raise ValueError(f"extra_metadata values must be strings; not for {not_strings}")
    metadata = {
        "format": FORMAT,
        "layer": str(directions.layer),
        "labels": json.dumps(directions.labels),
        "norms": json.dumps(directions.norms),
        "degenerate": str(directions.degenerate),
        "win_counts": json.dumps(directions.win_counts),
        "info": json.dumps(directions.info, default=_json_default),
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fsynced before results.json is written; a full disk is the one-line write error
    save_safetensors_atomic(
        path, {"vectors": directions.vectors.detach().float().contiguous()}, metadata
    )


def load_directions(path: str | Path) -> Directions:
    """Read directions written by ``save_directions``; extra metadata lands in
    ``info["extra_metadata"]``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        vectors = handle.get_tensor("vectors")
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an abliterate directions file (format {metadata.get('format')!r})"
        )
    info = json.loads(metadata["info"])
    info["extra_metadata"] = {k: v for k, v in metadata.items() if k not in _RESERVED_METADATA}
    return Directions(
        vectors=vectors,
        labels=json.loads(metadata["labels"]),
        layer=int(metadata["layer"]),
        norms=[float(v) for v in json.loads(metadata["norms"])],
        degenerate=int(metadata["degenerate"]),
        win_counts=json.loads(metadata["win_counts"]),
        info=info,
    )
