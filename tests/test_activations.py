"""Activations: one forward pass per batch for all layers, last-token position, the disk cache."""

from __future__ import annotations

import pytest
import torch

from abliterate.activations import collect_activations, run_forward_passes
from abliterate.architectures import get_decoder_layers
from abliterate.prompts import PromptSet
from abliterate.templates import count_post_instruction_tokens, format_chat

PROMPTS = PromptSet(
    "p", ("Name a red fruit.", "What is 2+2?", "Write one word about the sea, please.")
)


def _count_forwards(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, get_decoder_layers(model)[0].register_forward_hook(hook)


@pytest.mark.parametrize("family", ["llama", "qwen3_5", "gemma3"])
def test_last_token_activations_match_a_single_prompt_forward(tiny_loaded, family):
    loaded = tiny_loaded(family)
    batched = run_forward_passes(loaded, PROMPTS.prompts, "last", batch_size=3)  # left-padded batch
    n_layers = len(get_decoder_layers(loaded.model))
    assert batched.shape == (3, n_layers, loaded.model.config.get_text_config().hidden_size)
    text = format_chat(loaded.tokenizer, [PROMPTS.prompts[0]])[0]
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hidden = loaded.model(**ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output, except the last, which has the final norm applied
    for layer in range(n_layers - 1):
        torch.testing.assert_close(
            batched[0, layer], hidden[layer + 1][0, -1].float(), atol=1e-4, rtol=1e-4
        )


def test_one_forward_per_batch_for_all_layers(tiny_loaded):
    loaded = tiny_loaded("llama")
    calls, handle = _count_forwards(loaded.model)
    try:
        run_forward_passes(loaded, PROMPTS.prompts, "last", batch_size=2)
    finally:
        handle.remove()
    assert calls["n"] == 2  # ceil(3 / 2) batches, each giving every layer


def test_second_extraction_reads_the_cache_without_a_forward_pass(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    first = collect_activations(loaded, PROMPTS, "last", 2, tmp_path)
    calls, handle = _count_forwards(loaded.model)
    try:
        second = collect_activations(loaded, PROMPTS, "last", 2, tmp_path)
    finally:
        handle.remove()
    assert not first.cache_hit and second.cache_hit and calls["n"] == 0
    assert torch.equal(first.values, second.values)
    # another position is another entry
    third = collect_activations(loaded, PROMPTS, "mean_post_instruction", 2, tmp_path)
    assert not third.cache_hit and not torch.equal(third.values, first.values)


def test_corrupted_cache_entry_is_detected_and_rebuilt(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    first = collect_activations(loaded, PROMPTS, "last", 2, tmp_path)
    (entry,) = (tmp_path / "activations").glob("*/activations.safetensors")
    data = bytearray(entry.read_bytes())
    data[-8:] = b"\x00" * 8  # flip tensor bytes: the checksum no longer matches
    entry.write_bytes(bytes(data))
    again = collect_activations(loaded, PROMPTS, "last", 2, tmp_path)
    assert not again.cache_hit and torch.equal(again.values, first.values)
    entry.write_bytes(entry.read_bytes()[:50])  # truncated
    assert not collect_activations(loaded, PROMPTS, "last", 2, tmp_path).cache_hit


def test_means_accumulate_in_float64(tiny_loaded):
    loaded = tiny_loaded("llama")
    acts = collect_activations(loaded, PROMPTS, "last", 3, None)
    assert acts.mean().dtype == torch.float64 and acts.mean(1).shape == (acts.values.shape[-1],)


def test_post_instruction_tokens_counts_the_template_suffix(char_tokenizer):
    # ChatML suffix after the user text: "<|im_end|>", "\n", "<|im_start|>", "assistant\n" as chars
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    expected = len(char_tokenizer(suffix, add_special_tokens=False)["input_ids"])
    assert count_post_instruction_tokens(char_tokenizer) == expected
