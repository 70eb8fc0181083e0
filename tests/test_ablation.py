"""Properties of the ablation edit: projection, partial weights, hooks == weights, exact restore."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import (
    FAMILIES,
    build_tiny_model,
    sample_input_ids,
    single_torch_thread,
)

from abliterate.ablation import (
    AblationError,
    ablation_hooks,
    apply_ablation,
    apply_weight_ablation,
    build_residual_projection,
    removed_fraction,
    select_writers,
)
from abliterate.architectures import get_decoder_layers, resolve_residual_writers
from abliterate.config import AblationConfig, Combine


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_torch_thread():
        yield


COMBINES = tuple(combine.value for combine in Combine if combine != Combine.auto)
MERGED = AblationConfig(combine="merged")  # the default combine=auto must be resolved first
POST_NORM_FAMILIES = ("gemma3", "gemma3_multimodal")
D_MODEL = 64


@functools.cache
def cached_model(family: str):
    """One model per family for the tests that leave it unchanged (weight edits are restored)."""
    model = build_tiny_model(family)
    return model, resolve_residual_writers(model)


def random_directions(k: int, seed: int, orthonormal: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(k, D_MODEL, generator=generator)
    if orthonormal:
        directions = torch.linalg.qr(directions.T).Q.T.contiguous()
    return directions * 3.0  # not unit: the edit must normalise


def unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_input_ids()).logits.clone()


def layer_outputs(model) -> list[torch.Tensor]:
    """The residual stream after every decoder layer, (batch, seq, d_model) each."""
    outputs: list[torch.Tensor] = []

    def capture(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [layer.register_forward_hook(capture) for layer in get_decoder_layers(model)]
    try:
        logits(model)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@functools.cache
def original_layer_outputs(family: str) -> list[torch.Tensor]:
    return layer_outputs(cached_model(family)[0])


@functools.cache
def original_logits(family: str) -> torch.Tensor:
    return logits(cached_model(family)[0])


def parameter_snapshot(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters(remove_duplicate=False)
    }


def residual_slices(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """(..., d_model): the written vectors of a weight along its residual axis."""
    return tensor.detach().movedim(axis, -1).double()


def effective_direction(writer, direction: torch.Tensor) -> torch.Tensor:
    """The direction projected out of this writer: r, or normalize(g * r) after a post norm."""
    gain = writer.post_norm_gain()
    direction = unit(direction.double())
    return direction if gain is None else unit(gain.double() * direction)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_projection_removes_directions_from_the_residual_stream(family, combine):
    model, writers = cached_model(family)
    # sum and sequential project a span exactly only for orthonormal directions; behind a post
    # norm the directions become normalize(g * r_i), which are not orthogonal, so Gemma gets one
    k = 1 if family in POST_NORM_FAMILIES and combine in ("sum", "sequential") else 3
    directions = random_directions(k, seed=1, orthonormal=combine in ("sum", "sequential"))
    cfg = AblationConfig(weight=1.0, scope="all", combine=combine, embeddings=True)
    # the stream-space axes the edit projects out (merged: one, subspace: the span, sum and
    # sequential of orthonormal directions: the span), an orthonormal basis of U's columns
    left = build_residual_projection(directions, cfg).left
    basis, singular_values, _ = torch.linalg.svd(left, full_matrices=False)
    checked = basis[:, singular_values > 1e-9].T.float()

    def worst_ratio(outputs):
        return max(
            ((hidden @ checked.T).abs() / hidden.norm(dim=-1, keepdim=True)).max().item()
            for hidden in outputs
        )

    assert worst_ratio(original_layer_outputs(family)) > 1e-2  # the property is not vacuous
    with apply_weight_ablation(writers, directions, layer=0, cfg=cfg):
        ablated = layer_outputs(model)
    assert len(ablated) == writers.num_layers
    assert worst_ratio(ablated) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_half_weight_leaves_half_of_the_component(family):
    model, writers = cached_model(family)
    direction = random_directions(1, seed=2)
    cfg = AblationConfig(weight=0.5, scope="all", combine="merged", embeddings=True)
    before = parameter_snapshot(model)
    with apply_weight_ablation(writers, direction, layer=0, cfg=cfg):
        for writer in select_writers(writers, 0, cfg):
            r = effective_direction(writer, direction[0])
            for name, parameter in zip(
                writer.parameter_paths, (writer.weight, writer.bias), strict=False
            ):
                axis = writer.residual_axis if name.endswith(writer.parameter_name) else -1
                original = residual_slices(before[name], axis)
                edited = residual_slices(parameter, axis)
                # W' = W - 0.5 r (r^T W): half the component along r, the rest untouched
                expected = original - 0.5 * (original @ r)[..., None] * r
                torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ("llama", "qwen3_5", "gemma3", "qwen3_moe"))
def test_half_weight_halves_the_writer_outputs(family):
    """Writer outputs before/after, where the writer's input is unchanged by the edit.

    With scope=layer and no embedding edit, the tested layer's attention writer sees the same
    input; the embedding's input is the token ids.
    """
    model, writers = cached_model(family)
    direction = random_directions(1, seed=3)
    layer = writers.num_layers - 1
    cases = [
        (writers.layers[layer].attention[0], False),
        (writers.embedding, True),
    ]
    for writer, embeddings in cases:
        cfg = AblationConfig(weight=0.5, scope="layer", combine="merged", embeddings=embeddings)
        outputs: list[torch.Tensor] = []
        handle = writer.module.register_forward_hook(
            lambda module, args, output, outputs=outputs: outputs.append(output.clone())
        )
        try:
            logits(model)
            with apply_weight_ablation(writers, direction, layer=layer, cfg=cfg):
                logits(model)
        finally:
            handle.remove()
        original, edited = outputs
        r = effective_direction(writer, direction[0]).float()
        expected = original - 0.5 * (original @ r)[..., None] * r
        torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-6)
        assert (original @ r).abs().max() > 1e-3


@pytest.mark.parametrize("scope", ("all", "layer"))
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_give_the_same_logits_as_weight_edits(family, combine, scope):
    model, writers = cached_model(family)
    directions = random_directions(3, seed=4)
    cfg = AblationConfig(weight=0.8, scope=scope, combine=combine, embeddings=scope == "all")
    original = original_logits(family)
    with apply_weight_ablation(writers, directions, layer=1, cfg=cfg):
        edited = logits(model)
    with ablation_hooks(model, writers, directions, layer=1, cfg=cfg):
        hooked = logits(model)
    assert not torch.allclose(edited, original, atol=1e-4)
    torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model), original, rtol=0, atol=0)


@pytest.mark.parametrize("family", ("llama", "qwen3", "gemma3", "qwen3_5_multimodal"))
def test_hooks_match_weights_with_norm_preserving_and_relative_scales(family):
    model, writers = cached_model(family)
    directions = random_directions(2, seed=5)
    scales = torch.tensor([0.7, 1.3])
    for combine in COMBINES:
        cfg = AblationConfig(
            weight=1.2,
            combine=combine,
            direction_norm="relative",
            norm_preserving=True,
            embeddings=True,
            mode="hooks",
        )
        with apply_weight_ablation(writers, directions, layer=0, cfg=cfg, scales=scales):
            edited = logits(model)
        with apply_ablation(model, writers, directions, layer=0, cfg=cfg, scales=scales):
            hooked = logits(model)
        torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-5)


def test_norm_preserving_hooks_refuse_fused_experts():
    model, writers = cached_model("qwen3_moe")
    cfg = AblationConfig(combine="merged", norm_preserving=True)
    with (
        pytest.raises(NotImplementedError, match="fused experts"),
        ablation_hooks(model, writers, random_directions(1, seed=0), layer=0, cfg=cfg),
    ):
        pass
    assert all(not writer.module._forward_hooks for writer in writers.all_layer_writers())


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_is_bit_exact_and_reties_embeddings(family):
    model, writers = cached_model(family)
    embedding = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    was_tied = lm_head.weight is embedding.weight
    before = parameter_snapshot(model)
    parameter_ids = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    original = logits(model)
    cfg = AblationConfig(
        weight=1.0, combine="sequential", embeddings=True, norm_preserving=True, scope="all"
    )
    edit = apply_weight_ablation(writers, random_directions(3, seed=6), layer=-1, cfg=cfg)
    try:
        assert not torch.equal(embedding.weight, before[f"{writers.embedding.path}.weight"])
        # the lm_head keeps the original tensor, so the logits layer itself is not edited
        lm_head_name = next(n for n in before if n.endswith("lm_head.weight"))
        assert torch.equal(lm_head.weight, before[lm_head_name])
        assert not torch.equal(logits(model), original)
    finally:
        edit.restore()
    edit.restore()  # idempotent
    after = dict(model.named_parameters(remove_duplicate=False))
    assert set(after) == set(before)
    for name, parameter in after.items():
        assert torch.equal(parameter, before[name]), name
        assert id(parameter) == parameter_ids[name], name
    assert (lm_head.weight is embedding.weight) == was_tied
    assert torch.equal(logits(model), original)


@pytest.mark.parametrize("family", ("llama", "qwen3_5_multimodal", "gemma3", "qwen2_moe"))
def test_scope_layer_touches_and_copies_only_that_layer(family):
    model, writers = cached_model(family)
    before = parameter_snapshot(model)
    layer = 1
    cfg = AblationConfig(scope="layer", combine="subspace")
    expected = {name for w in writers.layers[layer].writers for name in w.parameter_paths}
    with apply_weight_ablation(writers, random_directions(2, seed=7), layer=layer, cfg=cfg) as edit:
        assert set(edit.touched) == expected
        assert set(edit.originals) == expected
        for name, parameter in model.named_parameters(remove_duplicate=False):
            assert torch.equal(parameter, before[name]) == (name not in expected), name


@pytest.mark.parametrize("family", ("llama", "gemma3", "qwen3_moe", "qwen3_5_moe"))
def test_norm_preserving_keeps_written_vector_norms(family):
    model, writers = cached_model(family)
    direction = random_directions(1, seed=8)
    cfg = AblationConfig(weight=1.0, combine="merged", norm_preserving=True, embeddings=True)
    before = parameter_snapshot(model)
    with apply_weight_ablation(writers, direction, layer=0, cfg=cfg):
        for writer in select_writers(writers, 0, cfg):
            r = effective_direction(writer, direction[0])
            name = f"{writer.path}.{writer.parameter_name}"
            original = residual_slices(before[name], writer.residual_axis)
            edited = residual_slices(writer.weight, writer.residual_axis)
            torch.testing.assert_close(
                edited.norm(dim=-1), original.norm(dim=-1), rtol=1e-5, atol=1e-7
            )
            # rescaling keeps directions: at w=1 every written vector stays orthogonal to r
            assert ((edited @ r).abs() / edited.norm(dim=-1).clamp_min(1e-12)).max() < 1e-5


def test_projection_matrices_match_their_definitions():
    directions = random_directions(3, seed=9)
    r = unit(directions.double())
    identity = torch.eye(D_MODEL, dtype=torch.float64)
    w = 0.7

    def matrix(combine, **kwargs):
        cfg = AblationConfig(weight=w, combine=combine, **kwargs)
        scales = torch.tensor([0.5, 1.0, 2.0]) if kwargs else None
        return build_residual_projection(directions, cfg, scales)

    merged = unit(r.sum(0))
    torch.testing.assert_close(
        matrix("merged").matrix(), identity - w * torch.outer(merged, merged)
    )
    torch.testing.assert_close(matrix("sum").matrix(), identity - w * r.T @ r)
    sequential = identity
    for direction in r:
        sequential = (identity - w * torch.outer(direction, direction)) @ sequential
    torch.testing.assert_close(matrix("sequential").matrix(), sequential)
    q = torch.linalg.qr(r.T).Q
    torch.testing.assert_close(matrix("subspace").matrix(), identity - w * q @ q.T)

    # relative scales s: strengths w s_i^2; merged and subspace use w mean(s_i^2)
    s2 = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    relative = {"direction_norm": "relative"}
    torch.testing.assert_close(
        matrix("sum", **relative).matrix(), identity - w * r.T @ torch.diag(s2) @ r
    )
    torch.testing.assert_close(
        matrix("subspace", **relative).matrix(), identity - w * s2.mean() * q @ q.T
    )


def test_principal_is_the_rank_one_edit_that_removes_the_most():
    directions = random_directions(5, seed=11)
    r = unit(directions.double())
    w = 0.7
    principal = AblationConfig(weight=w, combine="principal")
    _, singular_values, right_vectors = torch.linalg.svd(r, full_matrices=False)
    p = right_vectors[0] * torch.sign(right_vectors[0] @ r.sum(0))  # signed with sum_i r_i
    projection = build_residual_projection(directions, principal)
    torch.testing.assert_close(projection.right[:, 0], p)
    identity = torch.eye(D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(projection.matrix(), identity - w * torch.outer(p, p))
    # the shares removed sum to w sigma_1^2, more than merged's rank-1 edit removes
    fractions = removed_fraction(directions, principal)
    assert sum(fractions) == pytest.approx(w * singular_values[0].item() ** 2, rel=1e-12)
    merged = removed_fraction(directions, AblationConfig(weight=w, combine="merged"))
    assert sum(fractions) > sum(merged)


def test_principal_equals_merged_for_parallel_and_survives_opposite_directions():
    direction = random_directions(1, seed=12)
    parallel = torch.cat([direction, 2 * direction])
    torch.testing.assert_close(
        build_residual_projection(parallel, AblationConfig(combine="principal")).matrix(),
        build_residual_projection(parallel, AblationConfig(combine="merged")).matrix(),
    )
    opposite = torch.cat([direction, -direction])
    with pytest.raises(AblationError, match="sum to zero"):
        build_residual_projection(opposite, AblationConfig(combine="merged"))
    cfg = AblationConfig(weight=0.6, combine="principal")
    assert removed_fraction(opposite, cfg) == pytest.approx([0.6, 0.6], abs=1e-12)


def test_principal_follows_the_aligned_directions_more_than_merged():
    # three directions near e_0 and one orthogonal to them (an off-axis category)
    directions = torch.zeros(4, D_MODEL, dtype=torch.float64)
    directions[:3, 0] = 1.0
    directions[:3, 2:5] = 0.1 * torch.eye(3, dtype=torch.float64)
    directions[3, 1] = 1.0
    merged = build_residual_projection(directions, AblationConfig(combine="merged")).right[:, 0]
    principal = build_residual_projection(directions, AblationConfig(combine="principal"))
    # m weighs the off-axis direction like the others (m_1 = 1 / |sum_i r_i|); p, the top
    # eigenvector of sum_i r_i r_i^T, is not pulled by a direction orthogonal to it at all
    assert merged[1].item() == pytest.approx((9.03 / 1.01 + 1) ** -0.5, rel=1e-9)
    assert principal.right[1, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert principal.right[0, 0].item() > 0.99


def test_post_norm_gain_makes_the_normalized_output_orthogonal():
    generator = torch.Generator().manual_seed(10)
    directions = random_directions(2, seed=10)
    gain = 1.0 + torch.randn(D_MODEL, generator=generator)
    x = torch.randn(20, D_MODEL, generator=generator)
    for combine in ("merged", "subspace"):
        cfg = AblationConfig(weight=1.0, combine=combine)
        projected = build_residual_projection(directions, cfg, gain=gain).apply(x)
        normed = gain * projected / projected.pow(2).mean(-1, keepdim=True).sqrt()
        checked = (
            unit(unit(directions).sum(0, keepdim=True)) if combine == "merged" else unit(directions)
        )
        assert ((normed @ checked.T).abs() / normed.norm(dim=-1, keepdim=True)).max() < 1e-5


def test_bad_directions_and_options_fail_loudly():
    _, writers = cached_model("qwen2")
    cfg = AblationConfig(combine="merged")
    directions = random_directions(3, seed=11)
    zero = directions.clone()
    zero[1] = 0
    with pytest.raises(AblationError, match=r"\[1\] have zero norm"):
        apply_weight_ablation(writers, zero, 0, cfg)
    with pytest.raises(AblationError, match="shape"):
        apply_weight_ablation(writers, directions[:, :10], 0, cfg)
    with pytest.raises(AblationError, match="finite"):
        apply_weight_ablation(writers, directions * float("nan"), 0, cfg)
    with pytest.raises(AblationError, match="out of range"):
        apply_weight_ablation(writers, directions, 7, cfg)
    with pytest.raises(AblationError, match="needs per-direction scales"):
        apply_weight_ablation(
            writers, directions, 0, AblationConfig(combine="merged", direction_norm="relative")
        )
    with pytest.raises(AblationError, match="direction_norm='unit'"):
        apply_weight_ablation(writers, directions, 0, cfg, scales=torch.ones(3))
    with pytest.raises(AblationError, match="combine"):
        apply_weight_ablation(writers, directions, 0, AblationConfig(combine="mean"))
    opposite = torch.stack([directions[0], -directions[0]])
    with pytest.raises(AblationError, match="sum to zero"):
        apply_weight_ablation(writers, opposite, 0, cfg)


def test_hooks_are_removed_after_an_exception():
    model, writers = cached_model("qwen3_5")
    original = logits(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        ablation_hooks(model, writers, random_directions(1, seed=12), 0, MERGED),
    ):
        raise RuntimeError("boom")
    for writer in writers.all_layer_writers():
        assert not writer.module._forward_hooks and not writer.module._forward_pre_hooks
    torch.testing.assert_close(logits(model), original, rtol=0, atol=0)


def test_hook_point_outside_the_model_fails():
    _, writers = cached_model("mistral")
    other = build_tiny_model("mistral")
    with (
        pytest.raises(AblationError, match="hook point"),
        ablation_hooks(other, writers, random_directions(1, seed=13), 0, MERGED),
    ):
        pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_edit_that_is_not_finite_is_refused_and_undone(bad):
    """The finite check is one float64 reduction per edited tensor; a single bad element in the
    last writer edited must still be caught, and every writer edited before it restored."""
    model = build_tiny_model("llama", seed=3)
    writers = resolve_residual_writers(model)
    before = parameter_snapshot(model)
    last = writers.all_layer_writers()[-1]
    with torch.no_grad():
        last.weight[0, 0] = bad
    poisoned = parameter_snapshot(model)
    with pytest.raises(AblationError, match="not finite"):
        apply_weight_ablation(writers, random_directions(1, seed=1), layer=-1, cfg=MERGED)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.nan_to_num(), b.nan_to_num())

    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert same(parameter, poisoned[name]), name  # the earlier writers' edits were undone
    assert sum(not same(poisoned[name], before[name]) for name in before) == 1
