"""The residual-writer registry finds every writer of every tiny family and fails loudly otherwise."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import (
    FAMILIES,
    MOE_FAMILIES,
    build_tiny_model,
    sample_input_ids,
    single_torch_thread,
)
from torch import nn

from abliterate.architectures import (
    ARCHITECTURES,
    ResidualWriterError,
    UnsupportedArchitectureError,
    get_decoder_layers,
    get_layer_count,
    get_text_config,
    resolve_residual_writers,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_torch_thread():
        yield


SHARED_EXPERT_FAMILIES = ("qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_multimodal")
GEMMA_FAMILIES = ("gemma3", "gemma3_multimodal")


def _sparse_layers(text_config) -> list[int]:
    num_experts = getattr(text_config, "num_experts", 0) or 0
    if num_experts == 0:
        return []
    mlp_only = getattr(text_config, "mlp_only_layers", None) or []
    step = getattr(text_config, "decoder_sparse_step", None) or 1
    return [
        i for i in range(text_config.num_hidden_layers) if i not in mlp_only and (i + 1) % step == 0
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_writer_is_found_and_counted_against_the_config(family):
    model = build_tiny_model(family)
    writers = resolve_residual_writers(model)
    text_config = get_text_config(model.config)
    layer_types = getattr(text_config, "layer_types", None) or []
    sparse = _sparse_layers(text_config)
    counts = writers.count()

    assert type(model).__name__ in ARCHITECTURES
    assert counts["layers"] == text_config.num_hidden_layers == len(writers.layers)
    assert counts["attention"] == text_config.num_hidden_layers
    assert counts["linear_attention"] == layer_types.count("linear_attention")
    assert counts["full_attention"] + counts["linear_attention"] == counts["attention"]
    assert counts["fused_experts"] == len(sparse)
    assert counts["experts"] == len(sparse) * (getattr(text_config, "num_experts", 0) or 0)
    assert counts["dense_mlp"] == text_config.num_hidden_layers - len(sparse)
    expected_shared = len(sparse) if family in SHARED_EXPERT_FAMILIES else 0
    assert counts["shared_experts"] == expected_shared
    expected_norms = 2 * text_config.num_hidden_layers if family in GEMMA_FAMILIES else 0
    assert counts["post_writer_norms"] == expected_norms
    assert writers.d_model == text_config.hidden_size
    assert writers.embedding.module is model.get_input_embeddings()
    assert writers.lm_head is model.get_output_embeddings()

    if family in MOE_FAMILIES:
        assert sparse, "the tiny MoE config should have sparse layers"
    for layer in writers.layers:
        assert len(layer.attention) == 1
        expected_role = (
            "linear_attention" if layer.layer_type == "linear_attention" else "attention"
        )
        assert layer.attention[0].role == expected_role
        for writer in layer.writers:
            assert writer.weight.shape[writer.residual_axis] == writers.d_model
        if layer.index in sparse:
            experts = next(w for w in layer.mlp if w.kind == "fused_experts")
            # transformers 5: (num_experts, hidden_size, moe_intermediate_size)
            assert experts.weight.shape == (
                text_config.num_experts,
                text_config.hidden_size,
                text_config.moe_intermediate_size,
            )
            assert experts.residual_axis == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_the_found_writers_makes_every_layer_the_identity(family):
    """If any writer were missed, some layer would still change the residual stream."""
    model = build_tiny_model(family)
    writers = resolve_residual_writers(model)
    with torch.no_grad():
        for writer in writers.all_layer_writers():
            writer.weight.zero_()
            if writer.bias is not None:
                writer.bias.zero_()

    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        captured.append((hidden_in.detach().clone(), hidden_out.detach().clone()))

    layers = get_decoder_layers(model)
    handles = [layer.register_forward_hook(capture, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=sample_input_ids())
    finally:
        for handle in handles:
            handle.remove()
    assert len(captured) == len(layers)
    for hidden_in, hidden_out in captured:
        assert hidden_in.abs().max() > 0
        torch.testing.assert_close(hidden_out, hidden_in, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_count_and_decoder_layers(family):
    model = build_tiny_model(family)
    assert get_layer_count(model.config) == len(get_decoder_layers(model))
    assert isinstance(get_decoder_layers(model), nn.ModuleList)


@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_post_writer_norm_gain_matches_the_norm_module(family):
    """Gemma's RMSNorm(x) = g * x / rms(x) with the gain the writer reports."""
    model = build_tiny_model(family)
    writers = resolve_residual_writers(model)
    x = torch.randn(5, writers.d_model)
    for writer in writers.all_layer_writers():
        gain = writer.post_norm_gain()
        assert gain is not None
        eps = writer.post_norm.eps
        expected = gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(writer.post_norm(x), expected, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_lists_the_supported_ones():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedArchitectureError) as error:
        resolve_residual_writers(model)
    assert "GPT2LMHeadModel" in str(error.value)
    for name in ("LlamaForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3MoeForCausalLM"):
        assert name in str(error.value)
    with pytest.raises(UnsupportedArchitectureError):
        get_decoder_layers(model)


def test_subclass_under_another_name_is_unsupported():
    class PatchedLlamaForCausalLM(transformers.LlamaForCausalLM):
        pass

    model = build_tiny_model("llama")
    model.__class__ = PatchedLlamaForCausalLM
    with pytest.raises(UnsupportedArchitectureError, match="PatchedLlamaForCausalLM"):
        resolve_residual_writers(model)


def test_missing_writer_names_layer_and_path():
    model = build_tiny_model("llama")
    mlp = get_decoder_layers(model)[1].mlp
    mlp.output_projection = mlp.down_proj  # renamed: the registry must not find it
    del mlp.down_proj
    with pytest.raises(ResidualWriterError) as error:
        resolve_residual_writers(model)
    assert "layer 1" in str(error.value) and "mlp.down_proj" in str(error.value)


def test_missing_attention_output_fails():
    model = build_tiny_model("mistral")
    del get_decoder_layers(model)[0].self_attn.o_proj
    with pytest.raises(ResidualWriterError, match=r"layer 0 .*attention output"):
        resolve_residual_writers(model)


def test_layer_with_both_attention_outputs_fails():
    model = build_tiny_model("qwen3_5")
    layers = get_decoder_layers(model)
    layers[1].linear_attn = layers[0].linear_attn  # full-attention layer 1 gains a second writer
    with pytest.raises(ResidualWriterError, match=r"layer 1 .*exactly one attention output"):
        resolve_residual_writers(model)


def test_layer_types_disagreeing_with_the_layers_fails():
    model = build_tiny_model("qwen3_5_multimodal")
    text_config = get_text_config(model.config)
    text_config.layer_types = ["full_attention"] + list(text_config.layer_types[1:])
    with pytest.raises(ResidualWriterError, match=r"layer 0 .*linear_attn\.out_proj"):
        resolve_residual_writers(model)


def test_expert_count_differing_from_the_config_fails():
    model = build_tiny_model("qwen3_moe")
    model.config.num_experts = 5
    with pytest.raises(ResidualWriterError, match=r"layer 1 .*4 experts .*num_experts=5"):
        resolve_residual_writers(model)


def test_sparse_layer_disagreeing_with_the_config_fails():
    model = build_tiny_model("qwen3_moe")
    model.config.mlp_only_layers = [0, 2]
    with pytest.raises(ResidualWriterError, match=r"layer 2 .*dense"):
        resolve_residual_writers(model)


def test_missing_shared_expert_fails():
    model = build_tiny_model("qwen2_moe")
    del get_decoder_layers(model)[1].mlp.shared_expert
    with pytest.raises(ResidualWriterError, match=r"layer 1 .*shared_expert\.down_proj"):
        resolve_residual_writers(model)


def test_layer_count_differing_from_the_config_fails():
    model = build_tiny_model("qwen2")
    del get_decoder_layers(model)[1]
    with pytest.raises(ResidualWriterError, match="num_hidden_layers=2"):
        resolve_residual_writers(model)
