"""Project refusal directions out of the residual-stream writers, as weight edits or as hooks.

For a unit direction r and a writer W with d_model along its residual axis the edit is

    W <- W - w r (r^T W)

(w = 1 removes r from everything W writes, w > 1 over-projects). Every option of
``AblationConfig`` turns the k directions into one linear map on d_model vectors of the form

    M = I - U V^T,   U, V: (d_model, rank)

applied to the writer along its residual axis: ``W <- M W``, and ``b <- M b`` for a bias, which is
written to the stream too. Hooks apply the same M to the writer's output, so both modes compute
the same function. With a_i the strength of direction i (``w``, or ``w s_i^2`` for relative
directions, see below):

- ``merged``: m = normalize(sum_i r_i), M = I - a m m^T;
- ``sum``: M = I - sum_i a_i r_i r_i^T (every rank-1 delta computed from the original W; with k
  nearly parallel directions the shared component is removed about k times over);
- ``sequential``: M = P_k ... P_1 with P_i = I - a_i r_i r_i^T (project one after another);
- ``subspace``: Q an orthonormal basis of span(r_1..r_k), M = I - a Q Q^T;
- ``principal``: p the first principal axis of the unit directions (the leading right singular
  vector of the (k, d_model) matrix of the r_i, not centred: centring would subtract the shared
  refusal component it is meant to find), M = I - a p p^T. Of all rank-1 edits it removes the
  most in total: sum_i (r_i . p)^2 = sigma_1^2, the maximum of sum_i (r_i . x)^2 over unit x,
  where ``merged`` maximises the linear sum_i r_i . x. As sigma_1^2 p = sum_i (r_i . p) r_i,
  each direction pulls p in proportion to its alignment with it (m weighs them all equally), so
  a category that points away from the rest bends p less than it bends m. Parallel directions
  give merged's axis; opposite ones (r, -r), whose merged direction is undefined, lose w each;
  for orthonormal directions sigma_1 is tied and p is arbitrary (use ``subspace``). p is signed
  to agree with sum_i r_i (M does not depend on the sign).

``direction_norm=relative``: the caller passes scales s_i = |d_i| / (mean activation norm at the
layer) and direction i is used as s_i r_i, so its projection strength is a_i = w s_i^2. The
relative mode changes strengths only, never directions. ``merged``, ``principal`` and
``subspace`` have a single strength a = w mean_i(s_i^2): with equal scales s every mode then
acts like the unit mode at weight w s^2, and for orthonormal directions ``subspace`` removes the
same total (trace of U V^T) as ``sum``.

Post-writer norms (Gemma 3 applies an RMSNorm with gain g to each writer output before the residual
add): RMSNorm(x) = g * x / rms(x), so RMSNorm(x) . r = x . (g * r) / rms(x). Removing r from x does
not remove it from the stream; removing r' = normalize(g * r) does, exactly, whatever rms(x) is.
Each direction is mapped to r' before the combination (``merged`` and ``principal`` map their axis;
``subspace`` spans the mapped directions), so the writer output loses the fraction w of its
component along r' and, at w = 1, the stream gets no component along r. ``sum`` and
``sequential`` remove a span exactly only for orthonormal directions, and the mapped directions
g * r_i are generally not orthogonal even when the r_i are: on post-norm writers only ``merged``,
``principal`` and ``subspace`` make the stream exactly orthogonal (to their axes) at w = 1.

``combine=auto`` (the config default) is resolved by ``effective_combine`` before anything is
built: ``merged`` for directions as extracted, ``subspace`` after ``extraction.orthogonalize=svd``.
SVD returns orthonormal axes, and merging k orthonormal axes e_1..e_k into m = sum_i e_i / sqrt(k)
removes only (e_i . m)^2 = 1/k of each of them at w = 1 (a ninth of the dominant axis for nine
categories), whatever the baseline; projecting their span removes all of each. The building
functions refuse an unresolved ``auto``. ``removed_fraction`` reports, for each extracted
direction, the share of it that the edit actually removes (the combination confound: merged
removes most of each direction when they are nearly parallel and little when they point apart).

``norm_preserving``: after the edit every written vector (the slice of the weight along its
residual axis: a column of an nn.Linear weight, an expert's column of the fused tensor, a row of
the embedding; a bias is one vector) is rescaled to its original norm. Rescaling keeps directions,
so at w = 1 the vectors stay orthogonal to r.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from abliterate.architectures import ResidualWriters, Writer
from abliterate.config import (
    AblationConfig,
    AblationMode,
    Combine,
    DirectionNorm,
    Orthogonalize,
    Scope,
    parse_choice,
)
from abliterate.hooks import Hook, attached

COMPUTE_DTYPE = torch.float32  # edits are computed in float32 and cast back to the parameter dtype
_BUILD_DTYPE = torch.float64  # the small (d_model, rank) factors are built in float64
_MIN_DIRECTION_NORM = 1e-8


class AblationError(ValueError):
    """Invalid directions, scales or options for an ablation."""


@dataclass(frozen=True)
class ResidualProjection:
    """The linear map M = I - left @ right^T on d_model vectors.

    Attributes:
        left: (d_model, rank) factor U.
        right: (d_model, rank) factor V.
    """

    left: torch.Tensor
    right: torch.Tensor

    def apply(self, tensor: torch.Tensor, axis: int = -1) -> torch.Tensor:
        """Apply M along ``axis`` of ``tensor``; returns float32 (COMPUTE_DTYPE)."""
        moved = tensor.movedim(axis, -1).to(COMPUTE_DTYPE)  # (..., d_model)
        left = self.left.to(device=tensor.device, dtype=COMPUTE_DTYPE)
        right = self.right.to(device=tensor.device, dtype=COMPUTE_DTYPE)
        # M x = x - U (V^T x), written for row vectors: x - (x V) U^T
        edited = moved - (moved @ right) @ left.T
        return edited.movedim(-1, axis)

    def matrix(self) -> torch.Tensor:
        """M as a dense (d_model, d_model) float64 matrix, for tests and diagnostics."""
        identity = torch.eye(self.left.shape[0], dtype=_BUILD_DTYPE, device=self.left.device)
        return identity - self.left.to(_BUILD_DTYPE) @ self.right.to(_BUILD_DTYPE).T


def build_residual_projection(
    directions: torch.Tensor,
    cfg: AblationConfig,
    scales: torch.Tensor | Sequence[float] | None = None,
    gain: torch.Tensor | None = None,
) -> ResidualProjection:
    """Combine k directions into the map M = I - U V^T that the edit applies to a writer.

    Args:
        directions: (k, d_model) directions; normalised here, so their norms do not matter.
        cfg: ablation options (weight, combine, direction_norm).
        scales: (k,) relative scales |d_i| / mean activation norm, required iff
            ``cfg.direction_norm == "relative"``.
        gain: (d_model,) gain g of an RMSNorm applied to the writer output before the residual
            add; each direction r is then replaced by normalize(g * r).

    Returns:
        The projection, with float64 factors on the directions' device.

    Raises:
        AblationError: bad shapes, non-finite or zero-norm directions, bad scales or options.
    """
    _check_config(cfg)
    unit = _normalize_directions(directions)  # (k, d_model) float64
    strengths = _direction_strengths(cfg, scales, unit.shape[0]).to(unit.device)  # (k,)
    if gain is not None:
        gain = gain.to(device=unit.device, dtype=_BUILD_DTYPE)
        if gain.shape != (unit.shape[1],) or not torch.isfinite(gain).all():
            raise AblationError(f"post-norm gain must be finite with shape ({unit.shape[1]},)")

    def through_gain(vectors: torch.Tensor) -> torch.Tensor:
        # (RMSNorm(x)) . r = x . (g r) / rms(x): project g r out of the writer instead of r
        if gain is None:
            return vectors
        return _normalize_directions(vectors * gain, what="gain-mapped direction")

    return _COMBINERS[cfg.combine](unit, strengths, through_gain)


# A combiner turns the (k, d_model) float64 unit directions and their (k,) strengths into M; the
# third argument maps stream-space directions to what a post-norm writer must lose (g * r).
_Combiner = Callable[
    [torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], ResidualProjection
]


def _combine_merged(
    unit: torch.Tensor,
    strengths: torch.Tensor,
    through_gain: Callable[[torch.Tensor], torch.Tensor],
) -> ResidualProjection:
    """m = normalize(sum_i r_i), M = I - a m m^T."""
    total = unit.sum(dim=0)
    if total.norm() < _MIN_DIRECTION_NORM * unit.shape[0]:
        raise AblationError("the unit directions sum to zero; merged direction undefined")
    merged = through_gain(_normalize_directions(total[None, :]))[0]  # (d_model,)
    strength = _shared_strength(strengths)
    return ResidualProjection(left=strength * merged[:, None], right=merged[:, None])


def _combine_sum(
    unit: torch.Tensor,
    strengths: torch.Tensor,
    through_gain: Callable[[torch.Tensor], torch.Tensor],
) -> ResidualProjection:
    """M = I - sum_i a_i r_i r_i^T."""
    mapped = through_gain(unit)  # (k, d_model)
    return ResidualProjection(left=(strengths[:, None] * mapped).T, right=mapped.T)


def _combine_sequential(
    unit: torch.Tensor,
    strengths: torch.Tensor,
    through_gain: Callable[[torch.Tensor], torch.Tensor],
) -> ResidualProjection:
    """M = P_k ... P_1, P_i = I - a_i r_i r_i^T."""
    # P_i M = (I - a r r^T)(I - U V^T) = I - [U, a r] [V, M^T r]^T
    left_columns: list[torch.Tensor] = []
    right_columns: list[torch.Tensor] = []
    for strength, direction in zip(strengths, through_gain(unit), strict=True):
        if left_columns:
            left, right = torch.stack(left_columns, 1), torch.stack(right_columns, 1)
            transposed_image = direction - right @ (left.T @ direction)  # M^T r
        else:
            transposed_image = direction
        left_columns.append(strength * direction)
        right_columns.append(transposed_image)
    return ResidualProjection(
        left=torch.stack(left_columns, 1), right=torch.stack(right_columns, 1)
    )


def _combine_subspace(
    unit: torch.Tensor,
    strengths: torch.Tensor,
    through_gain: Callable[[torch.Tensor], torch.Tensor],
) -> ResidualProjection:
    """Q an orthonormal basis of span(r_1..r_k), M = I - a Q Q^T."""
    mapped = through_gain(unit)  # (k, d_model)
    # rank by numpy's matrix_rank tolerance
    _, singular_values, right_vectors = torch.linalg.svd(mapped, full_matrices=False)
    tolerance = singular_values[0] * max(mapped.shape) * torch.finfo(_BUILD_DTYPE).eps
    rank = int((singular_values > tolerance).sum())
    basis = right_vectors[:rank].T  # (d_model, rank)
    return ResidualProjection(left=_shared_strength(strengths) * basis, right=basis)


def _combine_principal(
    unit: torch.Tensor,
    strengths: torch.Tensor,
    through_gain: Callable[[torch.Tensor], torch.Tensor],
) -> ResidualProjection:
    """p the leading right singular vector of the (k, d_model) unit directions, M = I - a p p^T."""
    _, _, right_vectors = torch.linalg.svd(unit, full_matrices=False)
    axis = right_vectors[0]  # (d_model,) unit
    if axis @ unit.sum(dim=0) < 0:
        axis = -axis  # M is the same either way; the sign makes the factors reproducible
    principal = through_gain(axis[None, :])[0]  # (d_model,)
    strength = _shared_strength(strengths)
    return ResidualProjection(left=strength * principal[:, None], right=principal[:, None])


# Every resolved ablation.combine (auto is resolved by effective_combine before an edit is built).
_COMBINERS: dict[str, _Combiner] = {
    Combine.merged: _combine_merged,
    Combine.sum: _combine_sum,
    Combine.sequential: _combine_sequential,
    Combine.subspace: _combine_subspace,
    Combine.principal: _combine_principal,
}


def effective_combine(ablation_cfg: AblationConfig, orthogonalize: str) -> Combine:
    """The combination an ablation really uses: ``ablation.combine``, with ``auto`` resolved.

    ``auto`` (the default) means ``merged`` for directions as extracted
    (``extraction.orthogonalize=none``) and ``subspace`` for SVD-orthogonalised ones
    (``orthogonalize=svd``). The reason: SVD returns orthonormal axes e_1..e_k, ordered by
    singular value, and merging them gives m = sum_i e_i / sqrt(k), so the merged edit at weight
    w removes w (e_i . m)^2 = w / k of each axis, the dominant one included (a ninth for nine
    categories). "SVD fails" would then follow from that arithmetic, not from the directions or
    the baseline. Projecting their span (``subspace``) removes the share w of every axis, which
    is what orthogonalising them is for. An explicit ``combine`` is returned unchanged, so
    sweeping ``ablation.combine=merged,subspace`` still measures the confound.

    Args:
        ablation_cfg: the ablation options (a dataclass or DictConfig with a ``combine`` field).
        orthogonalize: ``extraction.orthogonalize`` (``none`` or ``svd``).

    Returns:
        A resolved ``Combine`` (never ``auto``).

    Raises:
        AblationError: an unknown ``combine``, or ``auto`` with an unknown ``orthogonalize``.
    """
    combine = parse_choice(Combine, ablation_cfg.combine, "ablation.combine", AblationError)
    if combine != Combine.auto:
        return combine
    key = "extraction.orthogonalize"
    if parse_choice(Orthogonalize, orthogonalize, key, AblationError) == Orthogonalize.svd:
        return Combine.subspace
    return Combine.merged


def removed_fraction(
    directions: torch.Tensor,
    cfg: AblationConfig,
    scales: torch.Tensor | Sequence[float] | None = None,
    gain: torch.Tensor | None = None,
) -> list[float]:
    """The share of each extracted direction that the edit takes out, one value per direction.

    The edit sends everything a writer writes through M = I - U V^T (``W <- M W``; the same M
    that ``build_residual_projection`` gives ``apply_weight_ablation`` and the hooks). For a
    unit direction r_i, M r_i is what remains of a written vector r_i, and its component along
    r_i is r_i^T M r_i, so the share removed is

        removed_i = 1 - r_i^T M r_i = r_i^T (I - M) r_i = (U^T r_i) . (V^T r_i),

    computed in float64 from the factors of the real edit (it cannot drift from it). 1.0: r_i is
    projected out exactly; 0: untouched; > 1: over-projected (the written component along r_i
    changes sign); < 0 would mean the edit amplifies r_i. By hand, at weight w with unit scales:

    - ``merged`` (m = normalize(sum_j r_j)): w (r_i . m)^2. Two directions at angle theta lose
      w cos^2(theta / 2) each; parallel ones lose w; k orthonormal ones lose w / k.
    - ``sum``: w sum_j (r_i . r_j)^2. k parallel directions lose k w (over-projection), k
      orthonormal ones lose w.
    - ``sequential`` (M = P_k ... P_1, P_j = I - w r_j r_j^T): k parallel directions lose
      1 - (1 - w)^k; at w = 1 every listed direction loses exactly 1 (P_i kills r_i and every
      P_j is symmetric, so r_i^T P_k..P_1 r_i = (P_{i+1}^T..P_k^T r_i) . (P_i..P_1 r_i) = 0).
    - ``subspace``: w for every direction (each lies in the span that is projected out).
    - ``principal`` (p the first principal axis): w (r_i . p)^2, summing to w sigma_1^2, the
      largest total of any rank-1 edit.

    With ``direction_norm=relative`` the strengths are w s_j^2 (``merged``/``subspace``:
    w mean_j s_j^2) instead of w. The directions' own norms do not matter (they are normalised,
    as by the edit).

    Args:
        directions: (k, d_model) directions as passed to the edit.
        cfg: the ablation options with ``combine`` resolved (see ``effective_combine``).
        scales: (k,) relative scales, required iff ``cfg.direction_norm == "relative"``.
        gain: (d_model,) gain of a post-writer RMSNorm (Gemma 3). The edit then removes
            r'_i = normalize(g * r_i) from the writer output, the vector whose image after the
            norm carries r_i, and the value returned is r'_i^T (I - M) r'_i for that writer's M
            (the share of the writer output's r'_i component removed, before the norm's
            rescaling). Without it: the plain writers' figure.

    Returns:
        k floats; ``[]`` for k = 0.

    Raises:
        AblationError: as ``build_residual_projection`` (bad directions, scales or options,
            ``combine=auto`` unresolved).
    """
    if not isinstance(directions, torch.Tensor) or directions.ndim != 2:
        raise AblationError("directions must be a (k, d_model) tensor")
    _check_config(cfg)
    if directions.shape[0] == 0:
        return []
    projection = build_residual_projection(directions, cfg, scales, gain)
    probes = _normalize_directions(directions)  # (k, d_model) float64
    if gain is not None:
        probes = _normalize_directions(
            probes * gain.to(device=probes.device, dtype=_BUILD_DTYPE),
            what="gain-mapped direction",
        )
    left = probes @ projection.left.to(_BUILD_DTYPE)  # (k, rank): U^T r_i
    right = probes @ projection.right.to(_BUILD_DTYPE)  # (k, rank): V^T r_i
    return (left * right).sum(dim=1).tolist()


@dataclass(eq=False)
class WeightEdit:
    """Handle on an in-place weight edit; ``restore()`` puts back the exact original bits.

    Only the parameters the edit touched are copied. A tied embedding is not edited in place:
    the embedding module gets a new edited Parameter while the lm_head keeps the original one
    (untied, so logits are not edited), and restore puts the original Parameter object back on
    the embedding, re-establishing ``lm_head.weight is embedding.weight``. Calling
    ``model.tie_weights()`` during the edit would re-tie the lm_head to the edited copy.

    Usable as a context manager: the edit is restored on exit.
    """

    originals: dict[str, tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    swapped: dict[str, tuple[nn.Module, str, nn.Parameter]] = field(default_factory=dict)
    restored: bool = False

    @property
    def touched(self) -> list[str]:
        """Full names of the parameters this edit changed."""
        return [*self.originals, *self.swapped]

    def restore(self) -> None:
        """Put back the original bits of every touched parameter (idempotent)."""
        if self.restored:
            return
        with torch.no_grad():
            for parameter, original in self.originals.values():
                parameter.copy_(original)
        for module, name, original_parameter in self.swapped.values():
            setattr(module, name, original_parameter)
        self.originals.clear()
        self.swapped.clear()
        self.restored = True

    def __enter__(self) -> WeightEdit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def apply_weight_ablation(
    writers: ResidualWriters,
    directions: torch.Tensor,
    layer: int,
    cfg: AblationConfig,
    scales: torch.Tensor | None = None,
) -> WeightEdit:
    """Edit the residual writers in place: ``W <- M W`` along each writer's residual axis.

    Args:
        writers: from ``resolve_residual_writers(model)``.
        directions: (k, d_model) refusal directions of the tested layer.
        layer: the tested layer (negative counts from the end); with ``cfg.scope == "layer"``
            only its writers are edited.
        cfg: ablation options; ``cfg.mode`` is not read here.
        scales: (k,) relative scales, required iff ``cfg.direction_norm == "relative"``.

    Returns:
        A handle whose ``restore()`` (or context exit) undoes the edit bit-exactly. On an error
        midway the partial edit is restored before raising.
    """
    _check_directions(directions, writers.d_model)
    selected = select_writers(writers, layer, cfg)
    edit = WeightEdit()
    projection = build_residual_projection(directions, cfg, scales)
    try:
        with torch.no_grad():
            for writer in selected:
                gain = writer.post_norm_gain()
                writer_projection = (
                    projection
                    if gain is None
                    else build_residual_projection(directions, cfg, scales, gain)
                )
                _edit_writer(writer, writer_projection, cfg.norm_preserving, writers, edit)
    except BaseException:
        edit.restore()
        raise
    return edit


@contextmanager
def ablation_hooks(
    model: nn.Module,
    writers: ResidualWriters,
    directions: torch.Tensor,
    layer: int,
    cfg: AblationConfig,
    scales: torch.Tensor | None = None,
) -> Iterator[None]:
    """Apply the same edit at inference time: M on each selected writer's output.

    Hooks sit on the writer modules (nn.Linear, the fused experts module, whose output is a
    routing-weighted sum of expert outputs and so transforms like one writer, and the embedding),
    i.e. before any post-writer norm. ``norm_preserving`` is implemented for nn.Linear writers
    (an input pre-hook scales input unit j by |W_j| / |M W_j|, the weight-mode column rescaling)
    and for the embedding (the output row of token v is scaled by its row ratio). A tied lm_head
    is unaffected: only the embedding's forward is hooked.

    Args:
        model: the model the writers were resolved from; every hook point is checked against it.
        writers, directions, layer, cfg, scales: as in ``apply_weight_ablation``.

    Raises:
        AblationError: a hook point does not resolve in ``model``.
        NotImplementedError: ``norm_preserving`` with fused experts (the per-expert inputs are
            internal to the experts module).
    """
    _check_directions(directions, writers.d_model)
    selected = select_writers(writers, layer, cfg)
    for writer in selected:
        try:
            resolved = model.get_submodule(writer.path)
        except AttributeError as error:
            raise AblationError(
                f"hook point {writer.path!r} does not resolve in the model"
            ) from error
        if resolved is not writer.module:
            raise AblationError(f"hook point {writer.path!r} is not the resolved writer module")
        if cfg.norm_preserving and writer.kind == "fused_experts":
            raise NotImplementedError(
                f"norm_preserving in hooks mode is not implemented for fused experts "
                f"({writer.path}); use mode=weights"
            )
    projection = build_residual_projection(directions, cfg, scales)
    hooks = []
    for writer in selected:
        gain = writer.post_norm_gain()
        writer_projection = (
            projection if gain is None else build_residual_projection(directions, cfg, scales, gain)
        )
        hooks += _writer_hooks(writer, writer_projection, cfg.norm_preserving)
    with attached(hooks):
        yield


@contextmanager
def apply_ablation(
    model: nn.Module,
    writers: ResidualWriters,
    directions: torch.Tensor,
    layer: int,
    cfg: AblationConfig,
    scales: torch.Tensor | None = None,
) -> Iterator[None]:
    """Ablate for the duration of a ``with`` block, by weights or hooks as ``cfg.mode`` says.

    ``cfg.combine`` must be resolved (``effective_combine``); ``auto`` raises AblationError.
    """
    _check_config(cfg)
    if parse_choice(AblationMode, cfg.mode, "ablation.mode", AblationError) == AblationMode.weights:
        with apply_weight_ablation(writers, directions, layer, cfg, scales):
            yield
    else:
        with ablation_hooks(model, writers, directions, layer, cfg, scales):
            yield


def select_writers(writers: ResidualWriters, layer: int, cfg: AblationConfig) -> list[Writer]:
    """The writers an ablation edits: every layer's or the tested layer's, plus the embedding.

    The embedding is included whenever ``cfg.embeddings`` is set, whatever the scope: it belongs
    to no layer.
    """
    _check_config(cfg)
    index = resolve_layer_index(layer, writers.num_layers)
    if cfg.scope == "all":
        selected = writers.all_layer_writers()
    else:
        selected = list(writers.layers[index].writers)
    if cfg.embeddings:
        selected.append(writers.embedding)
    return selected


def resolve_layer_index(layer: int, num_layers: int) -> int:
    """A 0-based layer index; negative values count from the end."""
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise AblationError(f"layer {layer} is out of range for a model with {num_layers} layers")
    return index


def _edit_writer(
    writer: Writer,
    projection: ResidualProjection,
    norm_preserving: bool,
    writers: ResidualWriters,
    edit: WeightEdit,
) -> None:
    tied = writer.kind == "embedding" and _is_tied(writers)
    parameters = [(writer.parameter_name, writer.weight, writer.residual_axis)]
    bias = writer.bias
    if writer.bias_name is not None and bias is not None:
        parameters.append((writer.bias_name, bias, bias.ndim - 1))
    for name, parameter, axis in parameters:
        full_name = f"{writer.path}.{name}"
        if full_name in edit.originals or full_name in edit.swapped:
            raise AblationError(f"{full_name} selected twice")
        edited = projection.apply(parameter, axis)
        if norm_preserving:
            edited = _rescale_written_vectors(edited, parameter, axis)
        if not _all_finite(edited):
            raise AblationError(f"the edit of {full_name} is not finite")
        edited = edited.to(parameter.dtype)
        if tied:
            # untie: the embedding gets the edited copy, the lm_head keeps the original tensor
            replacement = nn.Parameter(edited, requires_grad=parameter.requires_grad)
            edit.swapped[full_name] = (writer.module, name, parameter)
            setattr(writer.module, name, replacement)
        else:
            edit.originals[full_name] = (parameter, parameter.detach().clone())
            parameter.copy_(edited)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one reduction: a NaN or an infinity makes the float64
    sum non-finite, and a finite sum (no overflow in float64 for any weight) clears them all."""
    return bool(torch.isfinite(torch.sum(tensor, dtype=torch.float64)))


def _rescale_written_vectors(
    edited: torch.Tensor, original: torch.Tensor, axis: int
) -> torch.Tensor:
    """Rescale each slice along ``axis`` (a written vector) back to its original norm."""
    return edited * _written_vector_ratios(edited, original, axis)


def _written_vector_ratios(edited: torch.Tensor, original: torch.Tensor, axis: int) -> torch.Tensor:
    """|original slice| / |edited slice| along ``axis``, keepdim; 1 where the edit left zero."""
    original_norms = original.to(COMPUTE_DTYPE).norm(dim=axis, keepdim=True)
    edited_norms = edited.norm(dim=axis, keepdim=True)
    # a vector removed entirely (edited norm 0) stays zero rather than dividing by zero
    return torch.where(
        edited_norms > 0, original_norms / edited_norms, torch.ones_like(edited_norms)
    )


def _writer_hooks(
    writer: Writer, projection: ResidualProjection, norm_preserving: bool
) -> list[Hook]:
    """The hooks that apply ``projection`` to one writer: an input pre-hook for a
    norm-preserved nn.Linear, then the output hook."""
    input_ratio = None  # (in,) for nn.Linear writers
    row_ratio = None  # (vocab,) for the embedding
    bias_correction = None  # (d_model,) makes M b into c_b M b for a norm-preserved bias
    if norm_preserving:
        with torch.no_grad():
            weight = writer.weight
            edited = projection.apply(weight, writer.residual_axis)
            ratio = _written_vector_ratios(edited, weight, writer.residual_axis)
            ratio = ratio.squeeze(writer.residual_axis)
            if writer.kind == "linear":
                input_ratio = ratio  # weight (d_model, in): one ratio per input unit
            elif writer.kind == "embedding":
                row_ratio = ratio  # weight (vocab, d_model): one ratio per token
            if writer.bias is not None:
                projected_bias = projection.apply(writer.bias, -1)
                bias_ratio = _rescale_written_vectors(projected_bias, writer.bias, -1)
                bias_correction = bias_ratio - projected_bias  # (c_b - 1) M b

    def scale_input(module: nn.Module, args: tuple) -> tuple:
        assert input_ratio is not None
        (hidden,) = args[:1]
        scaled = hidden * input_ratio.to(device=hidden.device, dtype=hidden.dtype)
        return (scaled, *args[1:])

    def project_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{writer.path} returned {type(output).__name__}, not a tensor")
        projected = projection.apply(output, -1)  # (..., d_model)
        if row_ratio is not None:
            token_ids = args[0]
            projected = projected * row_ratio.to(output.device)[token_ids][..., None]
        if bias_correction is not None:
            projected = projected + bias_correction.to(output.device)
        return projected.to(output.dtype)

    output_hook = Hook(writer.module, "forward", project_output)
    if input_ratio is None:
        return [output_hook]
    return [Hook(writer.module, "forward_pre", scale_input), output_hook]


def _is_tied(writers: ResidualWriters) -> bool:
    lm_head_weight = getattr(writers.lm_head, "weight", None)
    return lm_head_weight is not None and lm_head_weight is writers.embedding.weight


def _normalize_directions(directions: torch.Tensor, what: str = "direction") -> torch.Tensor:
    directions = directions.to(_BUILD_DTYPE)
    norms = directions.norm(dim=1)  # (k,)
    degenerate = (norms < _MIN_DIRECTION_NORM).nonzero().flatten().tolist()
    if degenerate:
        raise AblationError(
            f"{what}s {degenerate} have zero norm; report degenerate directions and drop them "
            "before ablating"
        )
    return directions / norms[:, None]


def _check_directions(directions: torch.Tensor, d_model: int) -> None:
    if not isinstance(directions, torch.Tensor) or directions.ndim != 2:
        raise AblationError("directions must be a (k, d_model) tensor")
    if directions.shape[0] < 1 or directions.shape[1] != d_model:
        raise AblationError(
            f"directions have shape {tuple(directions.shape)}; expected (k >= 1, {d_model})"
        )
    if not directions.is_floating_point() or not torch.isfinite(directions).all():
        raise AblationError("directions must be finite floating-point values")


def _direction_strengths(
    cfg: AblationConfig, scales: torch.Tensor | Sequence[float] | None, count: int
) -> torch.Tensor:
    """a_i = w (unit) or w s_i^2 (relative): the projection strength of each direction."""
    if cfg.direction_norm == "unit":
        if scales is not None:
            raise AblationError("scales were given but ablation.direction_norm='unit'")
        return torch.full((count,), float(cfg.weight), dtype=_BUILD_DTYPE)
    if scales is None:
        raise AblationError("ablation.direction_norm='relative' needs per-direction scales")
    scales = torch.as_tensor(scales, dtype=_BUILD_DTYPE).cpu()
    if scales.shape != (count,) or not torch.isfinite(scales).all() or (scales <= 0).any():
        raise AblationError(
            f"scales must be {count} finite positive numbers, got {scales.tolist()}"
        )
    return float(cfg.weight) * scales**2


def _shared_strength(strengths: torch.Tensor) -> torch.Tensor:
    """One strength for merged/subspace: w mean(s_i^2), i.e. the mean of the a_i."""
    return strengths.mean()


def _check_config(cfg: AblationConfig) -> None:
    if cfg.combine == "auto":
        raise AblationError(
            "ablation.combine='auto' was not resolved: call "
            "effective_combine(cfg.ablation, cfg.extraction.orthogonalize) and pass the result "
            "(merged without SVD, subspace after SVD) before building or applying an edit"
        )
    # a plain string from Python; a composed config holds enum members already
    for key, kind in (("scope", Scope), ("combine", Combine), ("direction_norm", DirectionNorm)):
        parse_choice(kind, getattr(cfg, key), f"ablation.{key}", AblationError)
    if not isinstance(cfg.weight, (int, float)) or not math.isfinite(cfg.weight) or cfg.weight < 0:
        raise AblationError(f"ablation.weight={cfg.weight!r} must be a finite number >= 0")
