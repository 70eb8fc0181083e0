"""Tiny random-init models, one per supported architecture family, built from transformers configs.

Nothing is downloaded: each factory builds a config class with a few layers, hidden size 64 and a
128-token vocabulary, then instantiates the model class in float32 and eval mode. Norm gains and
biases are re-drawn at random so that code paths which depend on them (Gemma's post-writer norm
gain ``1 + weight``, writer biases) are actually exercised instead of being identities / zeros.

Import from test files in ``tests/`` as ``from tiny_models import build_tiny_model, FAMILIES``
(pytest's default "prepend" import mode puts the test file's directory on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import transformers
from torch import nn

HIDDEN_SIZE = 64
VOCAB_SIZE = 128

# Attention heads are chosen so that heads * head_dim != HIDDEN_SIZE where the family allows it,
# which keeps q/k/v projections from looking like residual writers by shape.
_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_MOE = {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2}

_QWEN3_5_TEXT = {
    **_COMMON,
    "num_hidden_layers": 4,
    "head_dim": 16,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0]},
}

_QWEN3_5_VISION = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": HIDDEN_SIZE,
    "num_position_embeddings": 16,
}


def _llama() -> nn.Module:
    # Biases on o_proj and down_proj exercise the bias edit; tied embeddings exercise the untie.
    config = transformers.LlamaConfig(
        **_COMMON,
        num_hidden_layers=3,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def _mistral() -> nn.Module:
    config = transformers.MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=16)
    return transformers.MistralForCausalLM(config)


def _qwen2() -> nn.Module:
    config = transformers.Qwen2Config(**_COMMON, num_hidden_layers=2)
    return transformers.Qwen2ForCausalLM(config)


def _qwen3() -> nn.Module:
    config = transformers.Qwen3Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(config)


def _qwen3_5() -> nn.Module:
    config = transformers.Qwen3_5TextConfig(**_QWEN3_5_TEXT)
    return transformers.Qwen3_5ForCausalLM(config)


def _qwen3_5_multimodal() -> nn.Module:
    config = transformers.Qwen3_5Config(
        text_config=dict(_QWEN3_5_TEXT),
        vision_config=dict(_QWEN3_5_VISION),
        image_token_id=VOCAB_SIZE - 3,
        video_token_id=VOCAB_SIZE - 4,
        vision_start_token_id=VOCAB_SIZE - 5,
        vision_end_token_id=VOCAB_SIZE - 6,
        tie_word_embeddings=True,
    )
    return transformers.Qwen3_5ForConditionalGeneration(config)


def _gemma3_text_config() -> dict:
    return {
        **_COMMON,
        "num_hidden_layers": 3,
        "query_pre_attn_scalar": 8,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    }


def _gemma3() -> nn.Module:
    config = transformers.Gemma3TextConfig(**_gemma3_text_config())
    return transformers.Gemma3ForCausalLM(config)


def _gemma3_multimodal() -> nn.Module:
    config = transformers.Gemma3Config(
        text_config=_gemma3_text_config(),
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        mm_tokens_per_image=4,
        boi_token_index=VOCAB_SIZE - 3,
        eoi_token_index=VOCAB_SIZE - 4,
        image_token_index=VOCAB_SIZE - 5,
    )
    return transformers.Gemma3ForConditionalGeneration(config)


def _qwen3_moe() -> nn.Module:
    # Layer 0 is dense (mlp_only_layers), layers 1-2 are sparse with fused experts.
    config = transformers.Qwen3MoeConfig(
        **_COMMON, **_MOE, num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=True
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _qwen2_moe() -> nn.Module:
    config = transformers.Qwen2MoeConfig(
        **_COMMON, **_MOE, num_hidden_layers=2, shared_expert_intermediate_size=48
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_5_moe() -> nn.Module:
    text = {key: value for key, value in _QWEN3_5_TEXT.items() if key != "intermediate_size"}
    config = transformers.Qwen3_5MoeTextConfig(**text, **_MOE, shared_expert_intermediate_size=48)
    return transformers.Qwen3_5MoeForCausalLM(config)


def _qwen3_5_moe_multimodal() -> nn.Module:
    text = {key: value for key, value in _QWEN3_5_TEXT.items() if key != "intermediate_size"}
    config = transformers.Qwen3_5MoeConfig(
        text_config={**text, **_MOE, "shared_expert_intermediate_size": 48},
        vision_config=dict(_QWEN3_5_VISION),
        image_token_id=VOCAB_SIZE - 3,
        video_token_id=VOCAB_SIZE - 4,
        vision_start_token_id=VOCAB_SIZE - 5,
        vision_end_token_id=VOCAB_SIZE - 6,
    )
    return transformers.Qwen3_5MoeForConditionalGeneration(config)


FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_5": _qwen3_5,
    "qwen3_5_multimodal": _qwen3_5_multimodal,
    "gemma3": _gemma3,
    "gemma3_multimodal": _gemma3_multimodal,
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "qwen3_5_moe": _qwen3_5_moe,
    "qwen3_5_moe_multimodal": _qwen3_5_moe_multimodal,
}
FAMILIES: tuple[str, ...] = tuple(FACTORIES)
MOE_FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_multimodal")


def _randomize_norms_and_biases(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw norm gains and biases, which transformers initialises to constants."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm_gain = "norm" in name and leaf == "weight" and parameter.ndim == 1
            if is_norm_gain or leaf == "bias":
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.add_(noise.to(parameter.dtype))


def build_tiny_model(family: str, seed: int = 0) -> nn.Module:
    """Build a tiny random-init model of one architecture family, float32, eval mode.

    Args:
        family: one of ``FAMILIES``.
        seed: torch seed for the weights.

    Returns:
        The model, on CPU.
    """
    if family not in FACTORIES:
        raise KeyError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model = FACTORIES[family]().to(torch.float32).eval()
    _randomize_norms_and_biases(model, torch.Generator().manual_seed(seed + 1))
    return model


def sample_input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    """Random token ids that avoid the special and multimodal ids at both ends of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE - 8, (batch, length), generator=generator)


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    Tiny models spend their time in thread start-up and synchronisation: on a loaded 2-core
    machine one thread made their forward passes 50-100x faster than the default.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
