"""Where each architecture writes into the residual stream, as data.

A decoder layer updates the residual stream as ``h <- h + attention(h) + mlp(h)`` (with optional
norms on the writer outputs before the add, as in Gemma 3). Refusal abliteration edits every matrix
whose output is added to the stream: the attention output projection (``self_attn.o_proj``, or
``linear_attn.out_proj`` on Gated DeltaNet layers of hybrid models), the MLP output projection
(``mlp.down_proj`` on dense layers; on sparse layers the fused expert tensor ``mlp.experts.down_proj``
of shape (num_experts, d_model, moe_intermediate) plus ``mlp.shared_expert.down_proj`` where the
family has a shared expert), and optionally the token embedding.

``ARCHITECTURES`` maps a model class name (``type(model).__name__``) to an ``ArchitectureSpec``
saying where those modules live. ``resolve_residual_writers`` walks the model once, checks every
layer against its config (layer count, hidden size, ``layer_types`` of hybrids, expert counts of
MoE layers) and fails loudly instead of skipping anything it cannot find.

Not covered: vision towers of multimodal wrappers write image features into the stream through
their projector; only text tokens (the embedding) are treated as a writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

WRITER_KINDS: tuple[str, ...] = ("linear", "fused_experts", "embedding")


class UnsupportedArchitectureError(ValueError):
    """The model's class has no entry in ``ARCHITECTURES``."""


class ResidualWriterError(RuntimeError):
    """A residual writer path did not resolve, or the model disagrees with its config."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths of one architecture's residual-stream writers.

    ``decoder`` is relative to the model root; ``layers``, ``embedding`` and ``final_norm`` are
    relative to the decoder; writer and norm paths are relative to one decoder layer.
    """

    decoder: str = "model"  # the text decoder holding embedding, layers and final norm
    layers: str = "layers"
    embedding: str = "embed_tokens"
    final_norm: str = "norm"
    lm_head: str = "lm_head"  # relative to the model root
    attention_output: str = "self_attn.o_proj"  # softmax-attention layers
    linear_attention_output: str | None = None  # layers whose layer_types entry is linear_attention
    dense_mlp_output: str = "mlp.down_proj"
    fused_experts: str | None = None  # module with a 3-D `down_proj` (num_experts, d_model, inner)
    shared_expert_output: str | None = None  # on sparse layers of families with a shared expert
    post_attention_norm: str | None = None  # RMSNorm applied to the attention output before the add
    post_mlp_norm: str | None = None  # RMSNorm applied to the MLP output before the add
    norm_gain_offset: float = 0.0  # post-writer RMSNorm gain = offset + weight (Gemma: 1 + weight)


_DENSE = ArchitectureSpec()
_QWEN3_5 = replace(_DENSE, linear_attention_output="linear_attn.out_proj")
_GEMMA3 = replace(
    _DENSE,
    post_attention_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
    norm_gain_offset=1.0,  # Gemma3RMSNorm: x / rms(x) * (1 + weight)
)
_QWEN_MOE = replace(_DENSE, fused_experts="mlp.experts")
_QWEN_MOE_SHARED = replace(_QWEN_MOE, shared_expert_output="mlp.shared_expert.down_proj")
_QWEN3_5_MOE = replace(_QWEN_MOE_SHARED, linear_attention_output="linear_attn.out_proj")
_MULTIMODAL = "model.language_model"  # text decoder inside the multimodal wrappers

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": _DENSE,
    "MistralForCausalLM": _DENSE,
    "Qwen2ForCausalLM": _DENSE,
    "Qwen3ForCausalLM": _DENSE,
    "Qwen3_5ForCausalLM": _QWEN3_5,
    "Qwen3_5ForConditionalGeneration": replace(_QWEN3_5, decoder=_MULTIMODAL),
    "Gemma3ForCausalLM": _GEMMA3,
    "Gemma3ForConditionalGeneration": replace(_GEMMA3, decoder=_MULTIMODAL),
    "Qwen2MoeForCausalLM": _QWEN_MOE_SHARED,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "Qwen3_5MoeForCausalLM": _QWEN3_5_MOE,
    "Qwen3_5MoeForConditionalGeneration": replace(_QWEN3_5_MOE, decoder=_MULTIMODAL),
}


@dataclass(eq=False)
class Writer:
    """One parameter whose output is added to the residual stream.

    Attributes:
        path: dotted module path from the model root, e.g. ``model.layers.3.self_attn.o_proj``.
        module: the module holding the parameter (the hook point in hooks mode).
        kind: ``linear`` (nn.Linear, weight (d_model, in)), ``fused_experts`` (weight
            (num_experts, d_model, in), or (num_experts, in, d_model) when the experts module is
            transposed) or ``embedding`` (weight (vocab, d_model)).
        role: what it writes: ``attention``, ``linear_attention``, ``dense_mlp``, ``experts``,
            ``shared_expert`` or ``embedding``.
        parameter_name: attribute of ``module`` holding the weight.
        residual_axis: axis of the weight indexing d_model; slices along the other axes are the
            vectors the writer can add to the stream.
        bias_name: attribute of ``module`` holding a bias added to the stream, if any; its last
            axis indexes d_model.
        post_norm: RMSNorm applied to the writer's output before the residual add, if any.
        norm_gain_offset: the post norm's gain is ``norm_gain_offset + post_norm.weight``.
    """

    path: str
    module: nn.Module
    kind: str
    role: str
    parameter_name: str
    residual_axis: int
    bias_name: str | None = None
    post_norm: nn.Module | None = None
    norm_gain_offset: float = 0.0

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.parameter_name)

    @property
    def bias(self) -> nn.Parameter | None:
        return None if self.bias_name is None else getattr(self.module, self.bias_name)

    @property
    def parameter_paths(self) -> list[str]:
        """Full dotted names of the weight and bias, as in ``model.named_parameters()``."""
        names = [self.parameter_name] + ([self.bias_name] if self.bias_name else [])
        return [f"{self.path}.{name}" for name in names]

    def post_norm_gain(self) -> torch.Tensor | None:
        """The post-writer RMSNorm gain as float32 (d_model,), or None without a post norm."""
        if self.post_norm is None:
            return None
        weight = self.post_norm.weight
        assert isinstance(weight, torch.Tensor)
        return self.norm_gain_offset + weight.detach().float()


@dataclass
class LayerWriters:
    """The residual writers of one decoder layer."""

    index: int
    layer_type: str  # the config's layer_types entry, or "attention" without one
    attention: list[Writer] = field(default_factory=list)
    mlp: list[Writer] = field(default_factory=list)

    @property
    def writers(self) -> list[Writer]:
        return self.attention + self.mlp


@dataclass
class ResidualWriters:
    """Every residual-stream writer of a model, resolved once."""

    architecture: str
    num_layers: int
    d_model: int
    layers: list[LayerWriters]
    embedding: Writer
    lm_head: nn.Module

    def count(self) -> dict[str, int]:
        """Counts per writer type, for logs and for checks against the config."""
        writers = self.all_layer_writers()
        roles = [writer.role for writer in writers]
        fused = [writer for writer in writers if writer.kind == "fused_experts"]
        return {
            "layers": self.num_layers,
            "attention": sum(len(layer.attention) for layer in self.layers),
            "full_attention": roles.count("attention"),
            "linear_attention": roles.count("linear_attention"),
            "dense_mlp": roles.count("dense_mlp"),
            "fused_experts": roles.count("experts"),
            "experts": sum(writer.weight.shape[0] for writer in fused),
            "shared_experts": roles.count("shared_expert"),
            "post_writer_norms": sum(writer.post_norm is not None for writer in writers),
            "embedding": 1,
        }

    def all_layer_writers(self) -> list[Writer]:
        return [writer for layer in self.layers for writer in layer.writers]


def get_architecture_spec(model: nn.Module) -> ArchitectureSpec:
    """Look up the model's class name in ``ARCHITECTURES``.

    Raises:
        UnsupportedArchitectureError: listing the supported class names.
    """
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add an ArchitectureSpec to abliterate.architectures.ARCHITECTURES."
        )
    return ARCHITECTURES[name]


def get_text_config(config: Any) -> Any:
    """The decoder's config: ``config.text_config`` for multimodal wrappers, else ``config``."""
    return config.get_text_config(decoder=True)


def get_layer_count(config: Any) -> int:
    """Number of decoder layers, read from the (text) config without loading weights."""
    return int(get_text_config(config).num_hidden_layers)


def get_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list, whose outputs are the residual stream after each layer."""
    spec = get_architecture_spec(model)
    return _get_module(model, f"{spec.decoder}.{spec.layers}", where="decoder layers")


def resolve_residual_writers(model: nn.Module) -> ResidualWriters:
    """Find every residual-stream writer of every layer, checked against the model config.

    Args:
        model: a transformers model whose class is in ``ARCHITECTURES``.

    Returns:
        The writers of each layer, the embedding and the lm_head.

    Raises:
        UnsupportedArchitectureError: the class is not in the registry.
        ResidualWriterError: a path does not resolve, a layer has neither or both attention
            outputs, a layer disagrees with ``layer_types`` or with the config's experts, or a
            count differs from the config.
    """
    spec = get_architecture_spec(model)
    text_config = get_text_config(model.config)
    d_model = int(text_config.hidden_size)
    num_layers = int(text_config.num_hidden_layers)
    layer_list = get_decoder_layers(model)
    if len(layer_list) != num_layers:
        raise ResidualWriterError(
            f"{spec.decoder}.{spec.layers} has {len(layer_list)} layers but the config says "
            f"num_hidden_layers={num_layers}"
        )
    layer_types = getattr(text_config, "layer_types", None)
    sparse_layers = _expected_sparse_layers(text_config)
    layers_path = f"{spec.decoder}.{spec.layers}"
    layers = [
        _resolve_layer(
            layer_list[index], index, f"{layers_path}.{index}", spec, text_config, d_model,
            layer_type=layer_types[index] if layer_types else "attention",
            sparse=index in sparse_layers,
        )
        for index in range(num_layers)
    ]  # fmt: skip
    embedding_path = f"{spec.decoder}.{spec.embedding}"
    embedding_module = _get_module(model, embedding_path, where="embedding")
    embedding = Writer(
        embedding_path, embedding_module, "embedding", "embedding", "weight", residual_axis=1
    )
    _check_weight_shape(embedding, d_model)
    writers = ResidualWriters(
        architecture=type(model).__name__,
        num_layers=num_layers,
        d_model=d_model,
        layers=layers,
        embedding=embedding,
        lm_head=_get_module(model, spec.lm_head, where="lm_head"),
    )
    _check_counts(writers, text_config, sparse_layers)
    return writers


def _resolve_layer(
    layer: nn.Module,
    index: int,
    prefix: str,
    spec: ArchitectureSpec,
    text_config: Any,
    d_model: int,
    layer_type: str,
    sparse: bool,
) -> LayerWriters:
    where = f"layer {index} ({prefix})"
    candidates = [spec.attention_output] + [
        path for path in (spec.linear_attention_output,) if path is not None
    ]
    found = [path for path in candidates if _find_module(layer, path) is not None]
    if len(found) != 1:
        raise ResidualWriterError(
            f"{where}: expected exactly one attention output among {candidates}, found {found}"
        )
    if layer_type == "linear_attention" and spec.linear_attention_output is None:
        raise ResidualWriterError(
            f"{where}: config layer_types says linear_attention but the architecture spec has no "
            "linear_attention_output"
        )
    expected = (
        spec.linear_attention_output if layer_type == "linear_attention" else spec.attention_output
    )
    if found[0] != expected:
        raise ResidualWriterError(
            f"{where}: config layer_types says {layer_type!r}, which writes through {expected}, "
            f"but the layer has {found[0]}"
        )
    attention_norm = _find_norm(layer, spec.post_attention_norm, where)
    role = "linear_attention" if layer_type == "linear_attention" else "attention"
    attention = [
        _linear_writer(layer, expected, role, prefix, d_model, where, attention_norm, spec)
    ]

    dense = _find_module(layer, spec.dense_mlp_output) is not None
    fused = spec.fused_experts is not None and _find_module(layer, spec.fused_experts) is not None
    if dense == fused:
        raise ResidualWriterError(
            f"{where}: expected exactly one MLP output among "
            f"{[spec.dense_mlp_output, spec.fused_experts]}, found "
            f"{'both' if dense else 'neither'}"
        )
    if fused != sparse:
        raise ResidualWriterError(
            f"{where}: config says the MLP is {'sparse' if sparse else 'dense'} "
            f"(num_experts, mlp_only_layers, decoder_sparse_step) but the layer has "
            f"{spec.fused_experts if fused else spec.dense_mlp_output}"
        )
    mlp_norm = _find_norm(layer, spec.post_mlp_norm, where)
    if dense:
        mlp = [
            _linear_writer(
                layer, spec.dense_mlp_output, "dense_mlp", prefix, d_model, where, mlp_norm, spec
            )
        ]
    else:
        mlp = [_fused_experts_writer(layer, spec, prefix, text_config, d_model, where, mlp_norm)]
        if spec.shared_expert_output is not None:
            mlp.append(
                _linear_writer(
                    layer,
                    spec.shared_expert_output,
                    "shared_expert",
                    prefix,
                    d_model,
                    where,
                    mlp_norm,
                    spec,
                )
            )
    return LayerWriters(index=index, layer_type=layer_type, attention=attention, mlp=mlp)


def _linear_writer(
    layer: nn.Module,
    path: str,
    role: str,
    prefix: str,
    d_model: int,
    where: str,
    post_norm: nn.Module | None,
    spec: ArchitectureSpec,
) -> Writer:
    module = _find_module(layer, path)
    if not isinstance(module, nn.Linear):
        raise ResidualWriterError(
            f"{where}: {path} should be an nn.Linear, got {type(module).__name__}"
        )
    writer = Writer(
        path=f"{prefix}.{path}",
        module=module,
        kind="linear",
        role=role,
        parameter_name="weight",
        residual_axis=0,  # nn.Linear weight is (out_features=d_model, in_features)
        bias_name="bias" if module.bias is not None else None,
        post_norm=post_norm,
        norm_gain_offset=spec.norm_gain_offset,
    )
    _check_weight_shape(writer, d_model)
    return writer


def _fused_experts_writer(
    layer: nn.Module,
    spec: ArchitectureSpec,
    prefix: str,
    text_config: Any,
    d_model: int,
    where: str,
    post_norm: nn.Module | None,
) -> Writer:
    assert spec.fused_experts is not None
    module = _get_module(layer, spec.fused_experts, where=f"{where} experts")
    weight = getattr(module, "down_proj", None)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 3:
        raise ResidualWriterError(
            f"{where}: {spec.fused_experts}.down_proj should be a 3-D parameter "
            f"(num_experts, d_model, inner), got {type(weight).__name__}"
        )
    if getattr(module, "has_post_expert_norm", False):
        raise ResidualWriterError(
            f"{where}: {spec.fused_experts} normalises each expert output, so the edit is not a "
            "linear map of down_proj; not supported"
        )
    num_experts = _config_num_experts(text_config)
    if weight.shape[0] != num_experts:
        raise ResidualWriterError(
            f"{where}: {spec.fused_experts}.down_proj has {weight.shape[0]} experts but the config "
            f"says num_experts={num_experts}"
        )
    # transformers' experts kernels read `is_transposed`: (E, inner, d_model) instead of (E, d_model, inner)
    residual_axis = 2 if getattr(module, "is_transposed", False) else 1
    writer = Writer(
        path=f"{prefix}.{spec.fused_experts}",
        module=module,
        kind="fused_experts",
        role="experts",
        parameter_name="down_proj",
        residual_axis=residual_axis,
        bias_name="down_proj_bias" if getattr(module, "has_bias", False) else None,
        post_norm=post_norm,
        norm_gain_offset=spec.norm_gain_offset,
    )
    _check_weight_shape(writer, d_model)
    return writer


def _check_weight_shape(writer: Writer, d_model: int) -> None:
    weight = writer.weight
    if weight.shape[writer.residual_axis] != d_model:
        raise ResidualWriterError(
            f"{writer.path}.{writer.parameter_name} has shape {tuple(weight.shape)}; expected "
            f"d_model={d_model} on axis {writer.residual_axis}"
        )
    if not weight.is_floating_point():
        raise ResidualWriterError(
            f"{writer.path}.{writer.parameter_name} has dtype {weight.dtype}; quantized weights "
            "cannot be edited, load the model in a floating-point dtype"
        )
    bias = writer.bias
    if bias is not None and bias.shape[-1] != d_model:
        raise ResidualWriterError(
            f"{writer.path}.{writer.bias_name} has shape {tuple(bias.shape)}; expected d_model="
            f"{d_model} on its last axis"
        )


def _check_counts(writers: ResidualWriters, text_config: Any, sparse_layers: set[int]) -> None:
    """Check the totals against the config, independently of the per-layer checks."""
    counts = writers.count()
    layer_types = getattr(text_config, "layer_types", None) or []
    num_experts = _config_num_experts(text_config)
    expected = {
        "attention": writers.num_layers,
        "linear_attention": sum(kind == "linear_attention" for kind in layer_types),
        "fused_experts": len(sparse_layers),
        "experts": num_experts * len(sparse_layers),
        "dense_mlp": writers.num_layers - len(sparse_layers),
    }
    wrong = {key: (counts[key], value) for key, value in expected.items() if counts[key] != value}
    if wrong:
        details = ", ".join(
            f"{key}: found {got}, config {want}" for key, (got, want) in wrong.items()
        )
        raise ResidualWriterError(
            f"{writers.architecture}: writer counts differ from the config: {details}"
        )


def _config_num_experts(text_config: Any) -> int:
    return int(getattr(text_config, "num_experts", None) or 0)


def _expected_sparse_layers(text_config: Any) -> set[int]:
    """Layers with a mixture-of-experts MLP, by the Qwen MoE rule.

    A layer is sparse when the config has experts, the layer is not in ``mlp_only_layers`` and
    ``(index + 1) % decoder_sparse_step == 0``; families without those fields are sparse
    everywhere they have experts.
    """
    if _config_num_experts(text_config) == 0:
        return set()
    mlp_only = set(getattr(text_config, "mlp_only_layers", None) or [])
    step = int(getattr(text_config, "decoder_sparse_step", None) or 1)
    return {
        index
        for index in range(int(text_config.num_hidden_layers))
        if index not in mlp_only and (index + 1) % step == 0
    }


def _find_norm(layer: nn.Module, path: str | None, where: str) -> nn.Module | None:
    if path is None:
        return None
    norm = _find_module(layer, path)
    if norm is None or not isinstance(getattr(norm, "weight", None), nn.Parameter):
        raise ResidualWriterError(f"{where}: post-writer norm {path} not found or has no weight")
    return norm


def _find_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _get_module(root: nn.Module, path: str, where: str) -> Any:
    module = _find_module(root, path)
    if module is None:
        raise ResidualWriterError(f"{type(root).__name__}: {where} path {path!r} does not resolve")
    return module
