"""removed_fraction against hand computation, effective_combine, and the unresolved ``auto``.

Notation in the comments: e_1, e_2, ... are standard basis vectors of R^d, w the weight, and
removed_i = r_i^T (I - M) r_i for the edit's residual operator M and unit r_i.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from abliterate.ablation import (
    AblationError,
    apply_ablation,
    build_residual_projection,
    effective_combine,
    removed_fraction,
)
from abliterate.config import AblationConfig, Combine

D = 8
ROOT = Path(__file__).resolve().parents[1]


def e(i: int) -> torch.Tensor:
    vector = torch.zeros(D, dtype=torch.float64)
    vector[i] = 1.0
    return vector


def stack(*vectors: torch.Tensor) -> torch.Tensor:
    return torch.stack(vectors)


SQRT_HALF = math.sqrt(0.5)
PARALLEL_2 = stack(e(0), 3.0 * e(0))  # norms do not matter: both are e_1 once normalised
PARALLEL_3 = stack(e(0), e(0), 0.5 * e(0))
ORTHONORMAL_3 = stack(e(0), e(1), e(2))
ORTHONORMAL_8 = stack(*(e(i) for i in range(8)))  # all 8 axes of R^8
MIXED = stack(e(0), e(0) + e(1))  # r_1 = e_1, r_2 = (e_1 + e_2)/sqrt(2): 45 degrees apart


def fractions(directions, combine, weight=1.0, **kwargs) -> list[float]:
    return removed_fraction(directions, AblationConfig(weight=weight, combine=combine), **kwargs)


# (directions, combine, weight, expected removed_i), each derived by hand:
HAND_CASES = [
    # merged: m = normalize(sum_j r_j), M = I - w m m^T, removed_i = w (r_i . m)^2.
    # Two parallel directions: m = e_1, r_i . m = 1 -> w = 1 removes 1.0 of each.
    (PARALLEL_2, "merged", 1.0, [1.0, 1.0]),
    # k = 3 orthonormal: m = (e_1 + e_2 + e_3)/sqrt(3), (r_i . m)^2 = 1/3 at w = 1.
    (ORTHONORMAL_3, "merged", 1.0, [1 / 3] * 3),
    # k = 8 orthonormal at w = 1: 1/8 of each (the SVD confound).
    (ORTHONORMAL_8, "merged", 1.0, [1 / 8] * 8),
    # ... and at w = 0.5: w / k = 1/6.
    (ORTHONORMAL_3, "merged", 0.5, [1 / 6] * 3),
    # mixed, 45 degrees: m bisects them, (r_i . m)^2 = cos^2(22.5 deg) = (1 + cos 45)/2
    #   = (1 + 1/sqrt 2)/2 = 0.853553...; at w = 1.
    (MIXED, "merged", 1.0, [(1 + SQRT_HALF) / 2] * 2),
    # sum: M = I - w sum_j r_j r_j^T, removed_i = w sum_j (r_i . r_j)^2.
    # k = 3 parallel at w = 1: 3 each (the shared component removed 3 times: over-projection).
    (PARALLEL_3, "sum", 1.0, [3.0, 3.0, 3.0]),
    # two parallel at w = 0.5: 0.5 * 2 = 1.0.
    (PARALLEL_2, "sum", 0.5, [1.0, 1.0]),
    # orthonormal: only j = i contributes: w.
    (ORTHONORMAL_3, "sum", 1.0, [1.0] * 3),
    # mixed at w = 1: 1 + cos^2(45 deg) = 1 + 1/2 = 1.5 each.
    (MIXED, "sum", 1.0, [1.5, 1.5]),
    # sequential: M = P_k ... P_1, P_j = I - w r_j r_j^T.
    # k parallel: M = (I - w e e^T)^k = I - (1 - (1 - w)^k) e e^T.
    # k = 2, w = 1: 1 - 0 = 1.0 (P is idempotent, nothing more to remove).
    (PARALLEL_2, "sequential", 1.0, [1.0, 1.0]),
    # k = 2, w = 0.5: 1 - 0.25 = 0.75.
    (PARALLEL_2, "sequential", 0.5, [0.75, 0.75]),
    # k = 3, w = 0.5: 1 - 0.125 = 0.875.
    (PARALLEL_3, "sequential", 0.5, [0.875] * 3),
    # orthonormal: the P_j commute, M = I - w sum_j e_j e_j^T: w each.
    (ORTHONORMAL_3, "sequential", 0.5, [0.5] * 3),
    # mixed, w = 1: r_1^T P_2 P_1 r_1 = (P_2 r_1) . (P_1 r_1) = 0 since P_1 r_1 = 0, and
    # r_2^T P_2 P_1 r_2 = (P_2 r_2) . (P_1 r_2) = 0 since P_2 r_2 = 0: both lose 1.0.
    (MIXED, "sequential", 1.0, [1.0, 1.0]),
    # mixed, w = 0.5: P_1 r_1 = e_1/2, P_2 r_1 = e_1 - (1/2)(1/sqrt2) r_2 = (3/4) e_1 - (1/4) e_2,
    #   r_1^T M r_1 = (P_2 r_1) . (P_1 r_1) = 3/8 -> removed 5/8.
    #   P_2 r_2 = r_2 / 2, P_1 r_2 = r_2 - (1/2)(1/sqrt2) e_1 = (1/(2 sqrt2)) e_1 + (1/sqrt2) e_2,
    #   r_2^T M r_2 = (P_2 r_2) . (P_1 r_2) = (1/2)(1/sqrt2)(1/(2 sqrt2) + 1/sqrt2) = 3/8
    #   -> removed 5/8.
    (MIXED, "sequential", 0.5, [0.625, 0.625]),
    # subspace: M = I - w Q Q^T with Q an orthonormal basis of the span; every r_i lies in the
    # span, |Q^T r_i|^2 = 1: removed w, whatever the angles.
    (PARALLEL_3, "subspace", 1.0, [1.0] * 3),
    (ORTHONORMAL_3, "subspace", 1.0, [1.0] * 3),
    (ORTHONORMAL_8, "subspace", 1.0, [1.0] * 8),
    (MIXED, "subspace", 1.0, [1.0, 1.0]),
    (MIXED, "subspace", 0.5, [0.5, 0.5]),
    (ORTHONORMAL_3, "subspace", 1.2, [1.2] * 3),
]


@pytest.mark.parametrize(("directions", "combine", "weight", "expected"), HAND_CASES)
def test_removed_fraction_matches_hand_computation(directions, combine, weight, expected):
    got = fractions(directions, combine, weight)
    assert got == pytest.approx(expected, abs=1e-12)
    # float32 directions give the same figure (computed in float64 from normalised directions)
    assert fractions(directions.float(), combine, weight) == pytest.approx(expected, abs=1e-6)


def test_one_direction_gives_the_weight_for_every_combine():
    # k = 1: merged, sum, sequential and subspace are all I - w r r^T, removed w
    for combine in ("merged", "sum", "sequential", "subspace"):
        assert fractions(stack(e(3) - e(5)), combine, 0.8) == pytest.approx([0.8], abs=1e-12)


def test_mixed_three_directions_by_hand():
    # r_1 = e_1, r_2 = e_1 (parallel to r_1), r_3 = e_2 (orthogonal to both); w = 1
    directions = stack(e(0), e(0), e(1))
    # merged: sum = 2 e_1 + e_2, m = (2 e_1 + e_2)/sqrt 5: (r_1 . m)^2 = 4/5, (r_3 . m)^2 = 1/5
    assert fractions(directions, "merged") == pytest.approx([0.8, 0.8, 0.2], abs=1e-12)
    # sum: r_1: 1 + 1 + 0 = 2, r_2: 2, r_3: 0 + 0 + 1 = 1
    assert fractions(directions, "sum") == pytest.approx([2.0, 2.0, 1.0], abs=1e-12)
    # sequential, w = 1: each listed direction is killed (see HAND_CASES): 1, 1, 1
    assert fractions(directions, "sequential") == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    # subspace: span{e_1, e_2}: 1 each
    assert fractions(directions, "subspace") == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)


def test_relative_scales_change_the_strengths():
    # strengths a_i = w s_i^2; merged and subspace use the mean a = w mean(s_i^2)
    def relative(directions, combine, scales, weight=1.0):
        cfg = AblationConfig(weight=weight, combine=combine, direction_norm="relative")
        return removed_fraction(directions, cfg, torch.tensor(scales))

    # sum, orthonormal, w = 0.5, s = (1, 2): a = (0.5, 2.0)
    assert relative(stack(e(0), e(1)), "sum", [1.0, 2.0], 0.5) == pytest.approx([0.5, 2.0])
    # merged, parallel, w = 1, s = (1, 3): a = mean(1, 9) = 5, (r . m)^2 = 1 -> 5
    assert relative(PARALLEL_2, "merged", [1.0, 3.0]) == pytest.approx([5.0, 5.0])
    # subspace, orthonormal, w = 1, s = (0.5, 0.5): a = 0.25
    assert relative(stack(e(0), e(1)), "subspace", [0.5, 0.5]) == pytest.approx([0.25, 0.25])
    # sequential, parallel, w = 1, s = (1, 1): same as unit directions: 1
    assert relative(PARALLEL_2, "sequential", [1.0, 1.0]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("combine", ["merged", "sum", "sequential", "subspace"])
def test_removed_fraction_is_read_off_the_real_edit(combine):
    # random directions in d = 16: the figure must equal 1 - r_i . (M r_i) for the dense M of
    # build_residual_projection, and what the edit does to a written vector equal to r_i
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    directions[1] = directions[0] + 0.3 * directions[1]  # one nearly parallel pair
    cfg = AblationConfig(weight=0.7, combine=combine)
    unit = directions / directions.norm(dim=1, keepdim=True)
    projection = build_residual_projection(directions, cfg)
    dense = projection.matrix()
    expected = [1.0 - float(r @ dense @ r) for r in unit]
    assert removed_fraction(directions, cfg) == pytest.approx(expected, abs=1e-12)
    written = projection.apply(unit.T, axis=0).double()  # W = [r_1 .. r_k] as columns, W <- M W
    applied = [1.0 - float(unit[i] @ written[:, i]) for i in range(4)]
    assert removed_fraction(directions, cfg) == pytest.approx(applied, abs=1e-5)


def test_post_norm_gain_probes_the_mapped_directions():
    # with a gain the edit removes r' = normalize(g r); subspace at w = 1 removes all of each r'
    gain = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    got = removed_fraction(MIXED, AblationConfig(combine="subspace"), gain=gain)
    assert got == pytest.approx([1.0, 1.0], abs=1e-12)
    # merged with a gain on two parallel directions: m' = r', removed w
    got = removed_fraction(PARALLEL_2, AblationConfig(combine="merged", weight=0.4), gain=gain)
    assert got == pytest.approx([0.4, 0.4], abs=1e-12)


def test_removed_fraction_edge_cases():
    assert removed_fraction(torch.zeros(0, D), AblationConfig(combine="merged")) == []
    assert fractions(ORTHONORMAL_3, "sum", 0.0) == pytest.approx([0.0] * 3)
    with pytest.raises(AblationError, match="zero norm"):
        fractions(stack(e(0), torch.zeros(D, dtype=torch.float64)), "sum")
    with pytest.raises(AblationError, match="not resolved"):
        removed_fraction(ORTHONORMAL_3, AblationConfig())


def test_effective_combine_resolves_auto_by_orthogonalisation():
    assert AblationConfig().combine == "auto"
    assert "auto" in set(Combine)
    assert effective_combine(AblationConfig(), "none") == "merged"
    assert effective_combine(AblationConfig(), "svd") == "subspace"
    for combine in ("merged", "sum", "sequential", "subspace"):
        # an explicit value is kept, with or without SVD (sweeping combine measures the confound)
        for orthogonalize in ("none", "svd"):
            assert effective_combine(AblationConfig(combine=combine), orthogonalize) == combine
    # works on the DictConfig the pipeline holds
    assert effective_combine(OmegaConf.structured(AblationConfig()), "svd") == "subspace"
    with pytest.raises(AblationError, match="orthogonalize='pca'"):
        effective_combine(AblationConfig(), "pca")
    with pytest.raises(AblationError, match="combine='mean'"):
        effective_combine(AblationConfig(combine="mean"), "none")


def test_auto_is_the_configured_default():
    assert OmegaConf.load(ROOT / "conf/ablation/default.yaml").combine == "auto"
    for experiment in sorted((ROOT / "conf/experiment").glob("*.yaml")):
        combine = OmegaConf.load(experiment).ablation.combine
        assert combine in set(Combine), experiment.name


def test_unresolved_auto_is_refused_by_the_edit():
    directions = ORTHONORMAL_3.float()
    with pytest.raises(AblationError, match="'auto' was not resolved.*effective_combine"):
        build_residual_projection(directions, AblationConfig())
    # the check runs before the model or the writers are touched
    with (
        pytest.raises(AblationError, match="'auto' was not resolved"),
        apply_ablation(None, None, directions, 0, AblationConfig()),  # type: ignore[arg-type]
    ):
        pass
