"""No borrowed or stale results: seeds, memo keys, model identity, provenance and relaunches."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_pipeline import compose_trial

from abliterate import provenance, records
from abliterate.choices import RecipeName
from abliterate.pipeline import Session, run_trial


def _directions(out: Path) -> torch.Tensor:
    tensors = load_file(str(out / records.DIRECTIONS_FILE))
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def test_top_level_seed_drives_the_som(tiny_model_dir, tmp_path):
    """seed=0 and seed=1 give different SOM directions (real replicates); an explicit
    extraction.seed wins over the top-level seed."""
    session = Session()
    stored = {}
    for name, overrides in {
        "seed0": ["seed=0"],
        "seed1": ["seed=1"],
        "seed1_pinned0": ["seed=1", "extraction.seed=0"],
    }.items():
        cfg = compose_trial(
            tiny_model_dir, tmp_path, *overrides, f"paths.output_dir={tmp_path / name}"
        )
        results = run_trial(cfg, session=session)
        stored[name] = _directions(tmp_path / name)
        assert results["trial"]["extraction_seed"] == (0 if name != "seed1" else 1)
    assert not torch.equal(stored["seed0"], stored["seed1"])
    assert torch.equal(stored["seed0"], stored["seed1_pinned0"])


def test_directions_memo_is_keyed_on_the_baseline_prompts(tiny_model_dir, tmp_path):
    """Two trials in one session that differ only in the unmatched training pool must not share
    directions (the memo used to be keyed on the harmful prompts alone)."""
    session = Session()
    vectors = []
    for limit in (8, 24):
        out = tmp_path / f"limit{limit}"
        cfg = compose_trial(
            tiny_model_dir,
            tmp_path,
            "extraction=diff_in_means",
            f"data.unmatched_train.limit={limit}",
            f"paths.output_dir={out}",
        )
        run_trial(cfg, session=session)
        vectors.append(_directions(out))
    assert not torch.equal(vectors[0], vectors[1])


def test_results_carry_provenance(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_trial(tiny_model_dir, tmp_path, "model.batch_size=3")
    results = run_trial(cfg, session=Session())
    block = json.loads((tmp_path / "out" / "results.json").read_text())["provenance"]
    assert block == results["provenance"]
    assert block["config_hash"] == provenance.config_hash(cfg)
    assert block["code_version"] == provenance.code_version()
    assert block["batch_size"] == 3
    assert block["slurm_job_id"] == "4242"
    assert {"torch", "transformers", "python"} <= set(block["versions"])


def test_config_hash_ignores_keys_that_cannot_change_a_result(tiny_model_dir, tmp_path):
    base = provenance.config_hash(compose_trial(tiny_model_dir, tmp_path))
    for override in ("logger=none", "logger.tags=[x]", "force=true", "paths.cache_dir=/elsewhere"):
        assert provenance.config_hash(compose_trial(tiny_model_dir, tmp_path, override)) == base
    for override in ("seed=1", "ablation.weight=0.5", "eval.max_new_tokens=9"):
        assert provenance.config_hash(compose_trial(tiny_model_dir, tmp_path, override)) != base


def test_relaunch_reruns_a_trial_whose_config_or_code_changed(tiny_model_dir, tmp_path, capsys):
    session = Session()
    first = run_trial(compose_trial(tiny_model_dir, tmp_path, "logger=none"), session=session)
    # the same trial with a key that cannot change results: skipped (the very same results)
    again = run_trial(compose_trial(tiny_model_dir, tmp_path, "force=false"), session=session)
    assert again["timing_s"] == first["timing_s"]
    # the same directory with another config (a changed default, say): rerun, old results kept
    changed = run_trial(
        compose_trial(tiny_model_dir, tmp_path, "ablation.weight=0.5"), session=session
    )
    assert changed["trial"]["weight"] == 0.5
    out = capsys.readouterr().out
    assert "made with another config hash" in out and "rerunning" in out
    superseded = json.loads((tmp_path / "out" / "results.json.superseded").read_text())
    assert superseded["trial"]["weight"] == 1.0
    # code that computes differently (another results version): rerun too
    path = tmp_path / "out" / "results.json"
    written = json.loads(path.read_text())
    written["provenance"]["code_version"] = "0.0.1+results.1"
    path.write_text(json.dumps(written))
    rerun = run_trial(
        compose_trial(tiny_model_dir, tmp_path, "ablation.weight=0.5"), session=session
    )
    assert rerun["provenance"]["code_version"] == provenance.code_version()
    assert "code version 0.0.1+results.1" in capsys.readouterr().out


def test_folder_identity_follows_the_weights(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 16)
    before = provenance.model_identity("hub", folder)
    assert provenance.model_identity("hub", folder) == before
    (folder / "model.safetensors").write_bytes(b"b" * 17)
    assert provenance.model_identity("hub", folder) != before


def test_gguf_identity_is_the_file_not_its_folder(tmp_path):
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    one.write_bytes(b"x" * 8)
    two.write_bytes(b"y" * 9)
    assert provenance.model_identity("gguf", one) != provenance.model_identity("gguf", two)
    stat = one.stat()
    identity = provenance.model_identity("gguf", one)
    one.write_bytes(b"z" * 8)
    os.utime(one, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert provenance.model_identity("gguf", one) != identity


def test_hub_identity_is_the_resolved_commit():
    class Config:
        _commit_hash = "abc123"

    assert provenance.model_identity("hub", "org/not-a-local-dir", Config()) == (
        "hub:org/not-a-local-dir@abc123"
    )


@pytest.mark.parametrize("library", ["torch", "transformers"])
def test_cache_keys_change_with_the_numeric_libraries(monkeypatch, library):
    before = provenance.cache_key({"a": 1})
    versions = dict(provenance.library_versions())
    versions[library] = "0.0.0-other"
    monkeypatch.setattr(provenance, "library_versions", lambda: versions)
    assert provenance.cache_key({"a": 1}) != before
    monkeypatch.setattr(provenance, "RESULTS_VERSION", provenance.RESULTS_VERSION + 1)
    assert provenance.cache_key({"a": 1}) != before


def _embedded(*overrides: str):
    from hydra import compose, initialize_config_dir
    from test_pipeline import CONF

    from abliterate.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/unused", *overrides])


def test_the_hash_names_the_refuser_recipe_so_a_trial_on_another_build_is_not_reused(monkeypatch):
    """A trial run on v9 before model.recipe existed keeps its hash under model.recipe=v9 (and
    under the null recipe while v9 was the default); another recipe hashes differently, and so
    does the null recipe now that the default is v16, so a relaunch reruns instead of taking
    v9's results as its own."""
    default, v9, v12, v16 = (
        _embedded(*o)
        for o in ((), ("model.recipe=v9",), ("model.recipe=v12",), ("model.recipe=v16",))
    )
    earlier = OmegaConf.to_container(v9, resolve=True)
    del earlier["model"]["recipe"]  # a config written before the field existed
    assert provenance.config_hash(v9) == provenance.config_hash(earlier)
    assert provenance.config_hash(v12) != provenance.config_hash(v9)
    assert provenance.DEFAULT_REFUSER_RECIPE is RecipeName.v16
    assert provenance.config_hash(default) == provenance.config_hash(v16)
    assert provenance.config_hash(default) != provenance.config_hash(earlier)
    monkeypatch.setattr(provenance, "DEFAULT_REFUSER_RECIPE", RecipeName.v9)  # before session 11
    assert provenance.config_hash(default) == provenance.config_hash(v9)


def test_a_trial_from_before_the_recipe_field_is_labelled_v9_whatever_the_default(monkeypatch):
    """The committed study's configs have no model.recipe: they ran on v9, and stay labelled so
    (no recipe in the label) once the default is another recipe; a null recipe is the default."""
    from abliterate.records import model_label

    def results(model):
        return {"trial": {"model": "smollm2-135m-refuser"}, "config": {"model": model}}

    earlier = {"name": "smollm2-135m-refuser", "source": "embedded"}
    null = {**earlier, "recipe": None}
    assert model_label(results(earlier)) == "smollm2-135m-refuser"
    assert model_label(results(null)) == "smollm2-135m-refuser@v16"
    monkeypatch.setattr(provenance, "DEFAULT_REFUSER_RECIPE", RecipeName.v12)
    assert model_label(results(earlier)) == "smollm2-135m-refuser"
    assert model_label(results(null)) == "smollm2-135m-refuser@v12"
    assert model_label(results({**earlier, "recipe": "v9"})) == "smollm2-135m-refuser"


def test_a_null_recipe_is_the_build_the_trial_ran_on_not_todays_default(monkeypatch):
    """A trial written with model.recipe null while v9 was the default recorded v9's config hash:
    it stays v9's (label, report cell, reload) now that the default is v16; one written since is
    v16's; without a recorded hash, the current default; without the field, v9."""
    from abliterate import report
    from abliterate.records import model_label

    container = OmegaConf.to_container(_embedded(), resolve=True)
    assert container["model"]["recipe"] is None

    def finished(default):
        monkeypatch.setattr(provenance, "DEFAULT_REFUSER_RECIPE", default)
        recorded = provenance.config_hash(container)  # what the trial wrote then
        monkeypatch.undo()
        return {
            "trial": {"model": "smollm2-135m-refuser"},
            "config": copy.deepcopy(container),
            "provenance": {"config_hash": recorded},
        }

    then, now = finished(RecipeName.v9), finished(RecipeName.v16)
    assert provenance.recorded_recipe(then) == "v9"
    assert provenance.recorded_recipe(now) == "v16"
    assert model_label(then) == "smollm2-135m-refuser"
    assert model_label(now) == "smollm2-135m-refuser@v16"
    assert report.comparable_config(then) != report.comparable_config(now)
    no_hash = {**now, "provenance": {}}
    assert provenance.recorded_recipe(no_hash) == "v16"
    earlier = copy.deepcopy(then)
    del earlier["config"]["model"]["recipe"]
    assert provenance.recorded_recipe(earlier) == "v9"
    assert report.comparable_config(earlier) == report.comparable_config(then)
    hub = {**now, "config": {**now["config"], "model": {**container["model"], "source": "hub"}}}
    assert provenance.recorded_recipe(hub) is None


def test_a_recipe_for_a_model_that_is_not_embedded_is_one_error_line(tiny_model_dir, tmp_path):
    from abliterate.config import ConfigError, validate_config

    cfg = compose_trial(tiny_model_dir, tmp_path, "model.recipe=v9")
    with pytest.raises(
        ConfigError, match=r"^model.recipe='v9' applies only to model.source=embedded"
    ):
        validate_config(cfg)
    hub = compose_trial(tiny_model_dir, tmp_path)
    container = OmegaConf.to_container(hub, resolve=True)
    del container["model"]["recipe"]
    assert provenance.config_hash(hub) == provenance.config_hash(container)  # null: as before
