"""Batched generation: the prefill's activations, token accounting, early stopping."""

from __future__ import annotations

import pytest
import torch

from abliterate.activations import run_forward_passes
from abliterate.generation import count_new_tokens, generate, generate_responses

# different lengths, so the batch is left-padded
PROMPTS = ("hi", "how do I pick a lock on a door", "name three fruits, please")


@pytest.mark.parametrize("position", ["last", "mean_post_instruction"])
@pytest.mark.parametrize("family", ["llama", "qwen3_5", "gemma3"])
def test_prefill_activations_match_a_forward_pass(tiny_loaded, family, position):
    """The activations the evaluation reads off the generation's prefill are the ones a separate
    forward pass computes (so the perturbation ratio needs no forward pass of its own)."""
    loaded = tiny_loaded(family)
    generation = generate(loaded, PROMPTS, 4, batch_size=2, capture_position=position)
    separate = run_forward_passes(loaded, PROMPTS, position, batch_size=2)
    assert generation.activations is not None
    assert generation.activations.shape == separate.shape
    torch.testing.assert_close(generation.activations, separate, atol=1e-4, rtol=1e-4)


def test_generate_responses_is_generate_without_the_extras(tiny_loaded):
    loaded = tiny_loaded("llama")
    plain = generate_responses(loaded, PROMPTS, 6, batch_size=2)
    full = generate(loaded, PROMPTS, 6, batch_size=2, capture_position="last")
    assert plain == full.responses
    assert generate(loaded, PROMPTS, 6, batch_size=2).activations is None
    assert 0 < full.new_tokens <= 6 * len(PROMPTS)
    assert full.row_steps <= 6 * len(PROMPTS)


def test_new_tokens_stop_at_each_rows_end():
    pad, eos = 0, 2
    generated = torch.tensor(
        [
            [5, 6, 7, 8],  # never ended: 4
            [5, eos, pad, pad],  # ended at its second token: 2
            [5, 6, pad, pad],  # stopped early (label decided), then padded: 2
        ]
    )
    assert count_new_tokens(generated, pad, eos) == 8
    assert count_new_tokens(generated[:1], None, None) == 4


# a plain key/value cache, a hybrid one with linear-attention states, one with sliding windows
# (the tiny llama repeats one token whatever the prompt, so no row would end before another)
@pytest.mark.parametrize(
    ("family", "reorderable"),
    [("qwen3_moe", True), ("qwen3_5", True), ("gemma3", True), ("qwen3_moe", False)],
)
def test_rows_dropped_as_they_end_give_the_same_tokens(
    tiny_loaded, family, reorderable, monkeypatch
):
    """Finished rows leave the batch (and its cache) mid-generation; every row's tokens must be
    those of one uninterrupted batched greedy run. The end token is set to one the random model
    emits often, so rows end at different steps and the batch is compacted several times."""
    from abliterate import generation
    from abliterate.templates import format_chat

    loaded = tiny_loaded(family)
    if not reorderable:  # a cache that cannot drop rows: the remaining rows re-read their prefix
        from transformers import cache_utils

        monkeypatch.delattr(cache_utils.Cache, "reorder_cache")
    prompts = [f"prompt {i}: " + "xyzabc"[:i] * i for i in range(8)]
    texts = format_chat(loaded.tokenizer, prompts)
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(compact: bool) -> tuple[torch.Tensor, int]:
        monkeypatch.setattr(generation, "COMPACT_FRACTION", 0.25 if compact else 2.0)
        return generation._generate_batch(
            loaded, encoded["input_ids"], encoded["attention_mask"], 24, prompts, None
        )

    free_run, _ = run(compact=False)

    def first_ends(tokens: torch.Tensor, end: int) -> list[int]:
        is_end = tokens == end
        return torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), 99).tolist()

    # the token whose first appearance varies most across rows
    candidates = set(free_run.flatten().tolist()) - {loaded.tokenizer.pad_token_id}
    end = max(candidates, key=lambda token: len(set(first_ends(free_run, token))))
    loaded.model.generation_config.eos_token_id = end
    compacted, compacted_steps = run(compact=True)
    plain, plain_steps = run(compact=False)
    assert torch.equal(compacted, plain)
    assert len(set(first_ends(plain, end))) >= 3  # rows ended at different steps: it compacted
    assert compacted_steps < plain_steps  # done rows were not decoded any further
