"""Evaluation fast paths: batched teacher-forced KL, the unedited model's cached evaluation with
its activations, stratified harmful subsets, and the batch size chosen for the device."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from abliterate.classify import COMPLY, REFUSE
from abliterate.config import ConfigError, EvalConfig, register_configs
from abliterate.evaluation import (
    EvalPrompts,
    KLReference,
    SetResult,
    UneditedEvaluation,
    compute_kl,
    compute_kl_reference,
    evaluate_unedited,
    select_eval_prompts,
    summarize_evaluation,
)
from abliterate.models import CPU_BATCH_SIZE, MAX_BATCH_SIZE, choose_batch_size
from abliterate.prompts import PromptSet, load_builtin
from abliterate.records import _json_safe, format_summary

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


def test_unedited_eval_cache_keeps_the_harmful_activations(tiny_loaded, tmp_path):
    loaded = tiny_loaded("llama")
    cfg = OmegaConf.structured(EvalConfig(max_new_tokens=3, kl_prompts=2))
    prompts = EvalPrompts(
        harmful=PromptSet("harmful", ("pick a lock", "make a fake id"), ("hacking", "fraud")),
        unmatched=PromptSet("unmatched", ("name a fruit",)),
        matched=PromptSet("matched", ("how do locks work",), ("hacking",)),
        kl=PromptSet("kl", ("name a fruit", "count to three")),
    )
    first = evaluate_unedited(loaded, prompts, cfg, tmp_path, capture_position="last")
    again = evaluate_unedited(loaded, prompts, cfg, tmp_path, capture_position="last")
    assert not first.cache_hit and again.cache_hit
    assert first.harmful_activations is not None and first.harmful_activations.shape[0] == 2
    assert torch.equal(again.harmful_activations, first.harmful_activations)
    # without capture it is another cache entry, without activations
    plain = evaluate_unedited(loaded, prompts, cfg, tmp_path)
    assert not plain.cache_hit and plain.harmful_activations is None


def test_n_harmful_keeps_every_category_represented():
    harmful = load_builtin("harmful", "evaluation")
    empty, one = PromptSet("matched", ()), PromptSet("unmatched", ("name a fruit",))
    cfg = replace(
        EvalConfig(),
        harmful_per_category=16,
        n_harmful=32,
        n_unmatched=0,
        n_matched=0,
        kl_prompts=1,
    )
    selected = select_eval_prompts(harmful, one, empty, cfg).harmful
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


# --- eval set sizes: Petrov's evaluation, too-small sets, recorded counts ----------------------

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose_eval(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/unused", *overrides]).eval


def _builtin_eval_sets() -> tuple[PromptSet, PromptSet, PromptSet]:
    return tuple(load_builtin(kind, "evaluation") for kind in ("harmful", "unmatched", "matched"))


def test_petrov_eval_is_10_stratified_harmful_and_100_kl_prompts_over_50_tokens():
    cfg = _compose_eval("eval=petrov")
    assert (cfg.n_harmful, cfg.kl_prompts, cfg.kl_tokens, cfg.kl_top_k) == (10, 100, 50, 100)
    harmful, unmatched, matched = _builtin_eval_sets()
    prompts = select_eval_prompts(harmful, unmatched, matched, cfg)
    assert len(prompts.harmful) == 10
    assert set(prompts.harmful.categories) == set(harmful.category_names())  # all 9 categories
    assert len(prompts.kl) == 100
    assert len(prompts.unmatched) == cfg.n_unmatched and len(prompts.matched) == cfg.n_matched
    assert not set(prompts.kl.prompts) & set(prompts.unmatched.prompts)  # disjoint measurements


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({"n_harmful": 200}, ["eval.n_harmful=200", "144"]),
        # 2 per category over 9 categories gives 18, not 20
        ({"harmful_per_category": 2, "n_harmful": 20}, ["eval.n_harmful=20", "18"]),
        ({"harmful_per_category": 17}, ["eval.harmful_per_category=17"]),
        ({"n_unmatched": 129, "kl_prompts": 1}, ["eval.n_unmatched=129", "128"]),
        ({"n_matched": 145}, ["eval.n_matched=145", "144"]),
        (
            {"n_unmatched": 40, "kl_prompts": 100},
            ["eval.n_unmatched=40", "eval.kl_prompts=100", "128"],
        ),
        ({"n_unmatched": 0, "kl_prompts": 129}, ["eval.kl_prompts=129", "128"]),
    ],
)
def test_a_set_smaller_than_asked_is_a_config_error_naming_the_key(overrides, named):
    cfg = replace(EvalConfig(), **overrides)
    with pytest.raises(ConfigError) as error:
        select_eval_prompts(*_builtin_eval_sets(), cfg)
    message = str(error.value)
    assert "\n" not in message
    for text in named:
        assert text in message, (text, message)


def test_a_short_harmful_category_is_an_error_not_a_smaller_set():
    harmful = PromptSet("harmful_eval", ("a", "b", "c"), ("x", "x", "y"))
    unmatched = PromptSet("unmatched_eval", ("u1", "u2"))
    cfg = replace(EvalConfig(), harmful_per_category=2, n_unmatched=1, n_matched=0, kl_prompts=1)
    with pytest.raises(ConfigError, match=r"eval.harmful_per_category=2.*'y': 1"):
        select_eval_prompts(harmful, unmatched, PromptSet("matched_eval", ()), cfg)


def _set(labels: list[str]) -> SetResult:
    n = len(labels)
    return SetResult([f"p{i}" for i in range(n)], ["x"] * n, ["r"] * n, labels)


def test_summary_records_every_count_and_an_empty_set_rate_is_null():
    cfg = OmegaConf.structured(EvalConfig(n_unmatched=0, kl_tokens=5))
    sets = {
        "harmful": _set([REFUSE, COMPLY, COMPLY]),
        "unmatched": _set([]),
        "matched": _set([REFUSE, COMPLY]),
    }
    n_kl, width = 7, 12
    reference = KLReference(
        torch.zeros(n_kl, width, dtype=torch.long),
        torch.ones(n_kl, width, dtype=torch.long),
        torch.ones(n_kl, 5, dtype=torch.bool),
        torch.zeros(n_kl, 5, 3),
        None,
    )
    unedited = UneditedEvaluation({**sets, "harmful": _set([REFUSE] * 3)}, reference)
    summary = summarize_evaluation(sets, 0.25, unedited, cfg)
    assert summary["n_harmful"] == 3 and summary["n_harmless"] == 0 and summary["n_matched"] == 2
    assert summary["n_kl_prompts"] == 7 and summary["kl_tokens"] == 5
    assert summary["harmless_refusal_rate"] is None and summary["harmless_evasive_rate"] is None
    assert summary["matched_harmless_refusal_rate"] == 0.5
    assert summary["refusal_rate"] == pytest.approx(1 / 3)
    rates = unedited.rates()
    assert rates["harmless_refusal_rate"] is None and rates["refusal_rate"] == 1.0
    results = {
        "trial": dict.fromkeys(
            ("model", "baseline", "extraction", "orthogonalize", "layer", "weight", "scope"), "x"
        )
        | {"combine": "merged"},
        "directions": {"count": 1, "degenerate": 0},
        "baseline_eval": rates,
        "eval": summary,
        "geometry": {},
        "timing_s": {"total": 1.0},
        "cache": {"activations": "hit"},
    }
    lines = format_summary(results).splitlines()
    # every rate is its count out of n; an empty set's rate is n/a with its n=0
    low, high = summary["refusal_rate_ci95"]
    assert lines[0].startswith("trial  x  baseline=x"), lines[0]
    assert lines[2] == (
        f"  harmful refusal   3/3 = 1.00 -> 1/3 = 0.33 [{low:.2f}, {high:.2f}]   judge=markers"
    )
    assert (
        lines[4] == "  harmless refusal  n/a (n=0) -> n/a (n=0)   matched 1/2 = 0.50 -> 1/2 = 0.50"
    )
    assert json.loads(json.dumps(_json_safe(results)))["eval"]["harmless_refusal_rate"] is None


def _summary_results(recipe: str | None, source: str = "embedded") -> dict:
    """A results.json as a trial on the embedded model writes it (the summary's fields)."""
    name = "smollm2-135m-refuser"
    return {
        "trial": {"model": name, "model_name": name, "baseline": "matched",
                  "extraction": "som_per_class", "orthogonalize": "none", "layer": 22,
                  "weight": 1.0, "scope": "all", "combine": "merged", "judge": "rules"},
        "config": {"model": {"name": name, "source": source, "path": name, "recipe": recipe}},
        "directions": {"count": 9, "degenerate": 0},
        "baseline_eval": {"n_harmful": 18, "outcomes": {"REFUSE": 15, "COMPLY": 3},
                          "refusal_rate": 15 / 18, "n_harmless": 24,
                          "harmless_refusal_rate": 1 / 24, "n_matched": 12,
                          "matched_harmless_refusal_rate": 3 / 12},
        "eval": {"n_harmful": 18, "n_harmless": 24, "n_matched": 12, "n_kl_prompts": 24,
                 "outcomes": {"REFUSE": 0, "COMPLY": 18}, "refusals": 0,
                 "baseline_refusals": 15, "refusal_rate": 0.0, "refusal_rate_ci95": [0.0, 0.18],
                 "harmless_refusals": 0, "harmless_refusal_rate": 0.0,
                 "matched_harmless_refusals": 1, "matched_harmless_refusal_rate": 1 / 12,
                 "refusals_removed": 15, "kl_divergence": 0.5, "kl_tokens": 1,
                 "efficiency": 30.0},
        "geometry": {},
        "timing_s": {"total": 1.0},
        "cache": {"activations": "miss"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "source", "label"),
    [
        (None, "embedded", "smollm2-135m-refuser@v16"),  # the default, v16 since session 11
        ("v9", "embedded", "smollm2-135m-refuser"),  # v9, the committed study's: the name as before
        ("v12", "embedded", "smollm2-135m-refuser@v12"),
        (None, "hub", "smollm2-135m-refuser"),  # a model that is not embedded has no recipe
    ],
)
def test_summary_names_the_refuser_build_and_counts_every_rate(recipe, source, label):
    from abliterate import report

    results = _summary_results(recipe, source)
    lines = format_summary(results).splitlines()
    assert lines[0].startswith(f"trial  {label}  baseline=matched  extraction="), lines[0]
    assert report.model_label(results) == label  # the report's label for the same trial
    assert lines[2] == "  harmful refusal   15/18 = 0.83 -> 0/18 = 0.00 [0.00, 0.18]   judge=rules"
    # the unedited model's false refusals are recorded as rates: their count is rate x n
    assert lines[4] == (
        "  harmless refusal  1/24 = 0.04 -> 0/24 = 0.00   matched 3/12 = 0.25 -> 1/12 = 0.08"
    )
