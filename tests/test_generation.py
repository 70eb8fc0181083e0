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
    assert full.steps <= 6 * 2  # two batches


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
