"""A whole trial on a tiny random-init model saved to disk and loaded like a real one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors import safe_open

from abliterate.config import ConfigError, register_configs
from abliterate.pipeline import Session, run_trial

CONF = str(Path(__file__).resolve().parents[1] / "conf")
CONTRACT_KEYS = {
    "trial": {"model", "baseline", "extraction", "orthogonalize", "layer", "weight", "scope", "combine",
              "direction_norm", "seed", "extraction_seed", "judge"},
    "directions": {"count", "norms", "degenerate"},
    "baseline_eval": {"refusal_rate", "harmless_refusal_rate", "matched_harmless_refusal_rate",
                      "refusal_rate_ci95", "outcomes", "n_harmful", "n_harmless", "n_matched"},
    "eval": {"n_harmful", "refusals", "refusal_rate", "evasive_rate", "comply_rate", "refusal_rate_by_category",
             "harmless_refusal_rate", "matched_harmless_refusal_rate", "kl_divergence", "kl_tokens", "efficiency",
             "outcomes", "incoherent_rate", "refusals_removed", "refusal_rate_ci95", "comply_rate_ci95",
             "evasive_rate_ci95", "incoherent_rate_ci95", "harmless_refusal_rate_ci95",
             "matched_harmless_refusal_rate_ci95", "n_harmless", "n_matched", "n_kl_prompts",
             "outcomes_by_category"},
    "geometry": {"norm_ratio_matched_to_unmatched", "cos_matched_unmatched", "cos_topic_unmatched",
                 "direction_cosines", "cosine_to_diff_in_means", "capture", "perturbation_ratio"},
    "timing_s": {"load", "activations", "directions", "ablation", "evaluation", "generation", "judge",
                 "total"},
    "cache": {"activations"},
    "provenance": {"config_hash", "code_version", "git_commit", "versions", "batch_size", "slurm_job_id"},
}  # fmt: skip


def compose_trial(tiny_model_dir: Path, tmp_path: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=hub",
                f"model.path={tiny_model_dir}",
                "model.name=tiny-llama",
                "model.default_layer=1",
                "model.dtype=float32",
                "model.device=cpu",
                "eval=quick",
                "eval.max_new_tokens=8",
                "extraction.iterations=200",
                "data.harmful_train.per_category=4",
                "data.matched_train.per_category=4",
                "data.unmatched_train.limit=24",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'out'}",
                *overrides,
            ],
        )


def test_trial_writes_the_results_contract(tiny_model_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, tmp_path, "baseline=matched")
    results = run_trial(cfg, session=Session())
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["status"] == "complete" and written["schema_version"] == 2
    for block, keys in CONTRACT_KEYS.items():
        assert keys <= set(written[block]), (block, keys - set(written[block]))
    assert written["trial"]["baseline"] == "matched" and written["trial"]["layer"] == 1
    assert written["directions"]["count"] == 9  # one per category (som_per_class)
    assert results["eval"]["n_harmful"] == 18
    ev = results["eval"]
    assert sum(ev["outcomes"].values()) == ev["n_harmful"]
    assert ev["refusals"] == ev["outcomes"]["REFUSE"]
    low, high = ev["refusal_rate_ci95"]
    assert low <= ev["refusal_rate"] <= high
    assert written["trial"]["judge"] == "rules"
    with safe_open(str(tmp_path / "out" / "directions.safetensors"), framework="pt") as handle:
        assert len(handle.keys()) >= 1
    rows = [
        json.loads(line)
        for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()
    ]
    assert {row["set"] for row in rows} == {"harmful", "unmatched", "matched"}
    assert {"prompt", "category", "response", "label"} <= set(rows[0])


def test_sweep_in_one_session_reuses_activations_and_unedited_eval(tiny_model_dir, tmp_path):
    session = Session()
    states = []
    for index, (baseline, weight) in enumerate(
        [("unmatched", 1.0), ("matched", 1.0), ("unmatched", 0.5)]
    ):
        cfg = compose_trial(
            tiny_model_dir, tmp_path, f"baseline={baseline}", f"ablation.weight={weight}",
            f"paths.output_dir={tmp_path / f'trial{index}'}",
        )  # fmt: skip
        results = run_trial(cfg, session=session)
        states.append((results["cache"]["activations"], results["cache"]["baseline_eval"]))
    assert states[0] == ("miss", "miss")
    assert all(state == ("hit", "hit") for state in states[1:])
    # a new process (new session) reads the disk cache
    cfg = compose_trial(tiny_model_dir, tmp_path, f"paths.output_dir={tmp_path / 'fresh'}")
    assert run_trial(cfg, session=Session())["cache"]["activations"] == "hit"


def test_complete_trial_is_skipped_unless_forced(tiny_model_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, tmp_path)
    session = Session()
    first = run_trial(cfg, session=session)
    again = run_trial(cfg, session=session)
    assert again["timing_s"] == first["timing_s"]  # read back, not rerun


def test_layer_out_of_range_names_the_valid_range(tiny_model_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, tmp_path, "layer=7")
    with pytest.raises(ConfigError, match=r"layer=7 .* valid: 0\.\.2"):
        run_trial(cfg, session=Session())


def test_bad_option_fails_at_compose_time(tiny_model_dir, tmp_path):
    # a choice is an enum of the structured config: composing fails, naming the key, the value
    # and the valid ones (run.py prints it as one line: tests/test_reliability.py)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as failure:
        compose_trial(tiny_model_dir, tmp_path, "ablation.combine=average")
    cause = str(failure.value.__cause__)
    assert "Invalid value 'average'" in cause and "full_key: ablation.combine" in cause
    assert "merged, sum, sequential, subspace, principal, auto" in cause


@pytest.mark.parametrize("embeddings", [False, True])
def test_export_saves_a_loadable_abliterated_model(tiny_model_dir, tmp_path, embeddings):
    import torch
    from transformers import AutoModelForCausalLM

    from abliterate.ablation import apply_ablation
    from abliterate.directions import load_directions

    cfg = compose_trial(
        tiny_model_dir, tmp_path, "export=true", f"ablation.embeddings={embeddings}"
    )
    session = Session()
    results = run_trial(cfg, session=session)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    assert (tmp_path / "out" / "model" / "abliteration_card.json").is_file()
    directions = load_directions(tmp_path / "out" / "directions.safetensors")
    ids = torch.tensor([[5, 17, 33, 40, 2]])
    model, writers = session.loaded.model, session.writers
    with torch.no_grad():
        original = model(ids).logits
        with apply_ablation(
            model,
            writers,
            directions.vectors,
            results["trial"]["layer"],
            OmegaConf.merge(cfg.ablation, {"combine": results["trial"]["combine"]}),
        ):
            ablated = model(ids).logits
        reloaded = exported(ids).logits
    assert torch.allclose(reloaded, ablated, atol=1e-5)
    assert not torch.allclose(reloaded, original, atol=1e-4)


def test_layer_is_checked_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    import abliterate.pipeline as pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the layer was checked")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    cfg = compose_trial(tiny_model_dir, tmp_path, "layer=-4")
    with pytest.raises(ConfigError, match=r"valid: 0\.\.2 \(or -3\.\.-1\)"):
        run_trial(cfg, session=Session())
