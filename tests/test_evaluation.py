"""Evaluation fast paths: batched teacher-forced KL, the cached baseline with its activations,
stratified harmful subsets, and the batch size chosen for the device."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from abliterate.config import EvalConfig
from abliterate.evaluation import (
    EvalPrompts,
    compute_kl,
    compute_kl_reference,
    evaluate_baseline,
    select_eval_prompts,
)
from abliterate.models import CPU_BATCH_SIZE, MAX_BATCH_SIZE, choose_batch_size
from abliterate.prompts import PromptSet, load_builtin

KL_PROMPTS = PromptSet("kl", ("name a fruit", "count to three", "say hello", "what is rain"))


@pytest.mark.parametrize("top_k", [None, 5])
def test_kl_in_batches_equals_kl_in_one_pass(tiny_loaded, top_k):
    loaded = tiny_loaded("llama")
    edited = tiny_loaded("llama", seed=1)  # another model plays the ablated one
    results = {}
    for batch_size in (1, 3, 4):
        loaded.batch_size = edited.batch_size = batch_size
        reference = compute_kl_reference(loaded, KL_PROMPTS, kl_tokens=3, top_k=top_k)
        assert compute_kl(loaded, reference) == pytest.approx(0.0, abs=1e-7)
        results[batch_size] = (reference, compute_kl(edited, reference))
    (one, kl_one), (all_rows, kl_all) = results[1], results[4]
    assert kl_all > 0
    assert kl_one == pytest.approx(kl_all, rel=1e-4)
    assert torch.equal(one.input_ids, all_rows.input_ids)
    torch.testing.assert_close(one.log_probs, all_rows.log_probs, atol=1e-5, rtol=1e-5)
    if top_k is not None:
        assert one.log_probs.shape[-1] == top_k + 1


def test_baseline_cache_keeps_the_harmful_activations(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    cfg = OmegaConf.structured(EvalConfig(max_new_tokens=3, kl_prompts=2))
    prompts = EvalPrompts(
        harmful=PromptSet("harmful", ("pick a lock", "make a fake id"), ("hacking", "fraud")),
        unmatched=PromptSet("unmatched", ("name a fruit",)),
        matched=PromptSet("matched", ("how do locks work",), ("hacking",)),
        kl=PromptSet("kl", ("name a fruit", "count to three")),
    )
    first = evaluate_baseline(loaded, prompts, cfg, tmp_path, capture_position="last")
    again = evaluate_baseline(loaded, prompts, cfg, tmp_path, capture_position="last")
    assert not first.cache_hit and again.cache_hit
    assert first.harmful_activations is not None and first.harmful_activations.shape[0] == 2
    assert torch.equal(again.harmful_activations, first.harmful_activations)
    # without capture it is another cache entry, without activations
    plain = evaluate_baseline(loaded, prompts, cfg, tmp_path)
    assert not plain.cache_hit and plain.harmful_activations is None


def test_n_harmful_keeps_every_category_represented():
    harmful = load_builtin("harmful", "evaluation")
    empty = PromptSet("unmatched", ())
    cfg = replace(EvalConfig(), harmful_per_category=16, n_harmful=32, kl_prompts=1)
    selected = select_eval_prompts(harmful, empty, empty, cfg).harmful
    assert len(selected) == 32
    counts = [selected.categories.count(c) for c in harmful.category_names()]
    assert max(counts) - min(counts) <= 1  # 32 over 9 categories: 4 or 3 each


def test_batch_size_is_chosen_for_the_device(tiny_loaded):
    model = tiny_loaded("llama").model
    assert choose_batch_size(model, torch.device("cpu")) == CPU_BATCH_SIZE
    large = choose_batch_size(model, torch.device("cuda"), free_bytes=139 * 2**30)
    small = choose_batch_size(model, torch.device("cuda"), free_bytes=2**20)
    assert large == MAX_BATCH_SIZE and small == 1
    sizes = [choose_batch_size(model, torch.device("cuda"), free_bytes=n * 2**24) for n in (1, 7)]
    assert all(size & (size - 1) == 0 for size in sizes)  # powers of two
