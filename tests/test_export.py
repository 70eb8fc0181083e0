"""python -m abliterate.export: a finished trial's edit, rebuilt from its records, as a
from_pretrained folder whose logits are the trial's edited model's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_pipeline import compose_trial
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from abliterate import evaluation
from abliterate.directions import Directions, load_directions, save_directions
from abliterate.export import main, model_card
from abliterate.pipeline import Session, run_trial

PROBE_IDS = torch.tensor([[5, 17, 33, 40, 2, 60, 71]])  # (1, 7) token ids of the tiny vocabulary


def run_probed_trial(tiny_model_dir: Path, tmp_path: Path, *overrides: str):
    """Run a tiny trial and return (results, trial directory, original logits, edited logits):
    the edited logits are computed inside the trial while its edit is applied (the trial's KL
    pass runs on the edited model), so they are the trial's own edited model, whatever mode."""
    probes: dict[str, torch.Tensor] = {}
    compute_kl = evaluation.compute_kl

    def probed_compute_kl(loaded, reference, *args, **kwargs):
        with torch.no_grad():
            probes["edited"] = loaded.model(PROBE_IDS.to(loaded.device)).logits.cpu()
        return compute_kl(loaded, reference, *args, **kwargs)

    trial_dir = tmp_path / "trial"
    cfg = compose_trial(
        tiny_model_dir, tmp_path, "logger=none", f"paths.output_dir={trial_dir}", *overrides
    )
    session = Session()
    evaluation.compute_kl = probed_compute_kl
    try:
        results = run_trial(cfg, session=session)
    finally:
        evaluation.compute_kl = compute_kl
    with torch.no_grad():
        original = session.loaded.model(PROBE_IDS).logits
    return results, trial_dir, original, probes["edited"]


@pytest.mark.parametrize(
    "overrides",
    [
        (),  # som_per_class, merged, scope=all, tied embeddings kept
        ("extraction.orthogonalize=svd", "ablation.direction_norm=relative",
         "ablation.embeddings=true", "ablation.norm_preserving=true",
         # relative strength is w s^2 with s = |d| / mean activation norm ~ 3e-3 on this model
         "ablation.weight=20000"),  # subspace, relative scales, untied embedding
    ],
    ids=["merged", "svd-relative-embeddings"],
)  # fmt: skip
def test_export_logits_equal_the_trials_edited_model(tiny_model_dir, tmp_path, overrides):
    results, trial_dir, original, edited = run_probed_trial(tiny_model_dir, tmp_path, *overrides)
    assert results["directions"]["count"] >= 1
    out = tmp_path / "exported"
    assert main([str(trial_dir), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        reloaded = exported(PROBE_IDS).logits
    # float32 weights saved as they are; the default float32 tolerances of assert_close. (The
    # merged edit reloads bit-identical; the SVD + relative + norm-preserving one has been seen
    # to differ from the trial's in-memory edit in the last bit of a few weights, <= 3e-8.)
    torch.testing.assert_close(reloaded, edited)
    assert not torch.allclose(reloaded, original, atol=1e-4)  # the edit is really in the weights
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template is not None
    generation = GenerationConfig.from_pretrained(out)
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.eos_token_id == tokenizer.eos_token_id
    card = json.loads((out / "abliteration_card.json").read_text())
    assert card["trial"] == results["trial"]
    assert card["chat"] == {"system_prompt": None, "disable_thinking": True}
    assert not list(tmp_path.glob(".exported.partial-*"))  # the staging folder is gone


def test_export_hooks_trial_matches_its_hook_edited_model(tiny_model_dir, tmp_path):
    """A trial evaluated with hooks exports the same function as weights (up to rounding)."""
    _, trial_dir, _, edited = run_probed_trial(tiny_model_dir, tmp_path, "ablation.mode=hooks")
    assert main([str(trial_dir), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(PROBE_IDS).logits, edited, rtol=1e-4, atol=1e-5)


def test_export_true_and_the_cli_write_the_same_model(tiny_model_dir, tmp_path):
    """export=true in a trial and the CLI on its directory are one code path: same weights,
    same card (the CLI's card also sees results.json's timing, which the trial's cannot)."""
    cfg = compose_trial(tiny_model_dir, tmp_path, "logger=none", "export=true")
    run_trial(cfg, session=Session())
    trial_dir = tmp_path / "out"
    assert main([str(trial_dir), "--out", str(tmp_path / "cli")]) == 0
    from_trial = load_file(trial_dir / "model" / "model.safetensors")
    from_cli = load_file(tmp_path / "cli" / "model.safetensors")
    assert from_trial.keys() == from_cli.keys()
    for name, tensor in from_trial.items():
        assert torch.equal(tensor, from_cli[name]), name
    assert (trial_dir / "model" / "README.md").read_text() == (
        tmp_path / "cli" / "README.md"
    ).read_text()
    # the default --out is the trial's own model/ folder: taken, so --overwrite is needed
    assert main([str(trial_dir)]) == 2
    assert main([str(trial_dir), "--overwrite"]) == 0


@pytest.fixture(scope="module")
def finished_trial(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("finished")
    cfg = compose_trial(tiny_model_dir, tmp_path, "logger=none")
    run_trial(cfg, session=Session())
    return tmp_path / "out"


def test_model_card_front_matter_settings_and_counted_metrics(finished_trial, tmp_path):
    from huggingface_hub import ModelCard

    results = json.loads((finished_trial / "results.json").read_text())
    assert main([str(finished_trial), "--out", str(tmp_path / "m")]) == 0
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "transformers"
    assert "abliterated" in card.data.tags and "baseline-unmatched" in card.data.tags
    assert card.data.base_model is None  # a local folder is not a hub id
    ev = results["eval"]
    refuse = ev["outcomes"]["REFUSE"]
    low, high = ev["refusal_rate_ci95"]
    assert (
        f"| harmful REFUSE | {refuse}/{ev['n_harmful']} = {ev['refusal_rate']:.2f} "
        f"[{low:.2f}, {high:.2f}] |" in card.text
    )
    assert f"| layer (0-based) | {results['trial']['layer']} of 3 |" in card.text
    assert "| combine | merged (configured: auto) |" in card.text

    # a hub model gets base_model; a set that was not evaluated is said to be, not shown as 0
    config = OmegaConf.create(results["config"])
    config.model.path = "Qwen/Qwen3.5-2B"
    unevaluated = json.loads(json.dumps(results))
    unevaluated["eval"].update(n_matched=0, matched_harmless_refusal_rate=None,
                               matched_harmless_refusals=None)  # fmt: skip
    text = model_card(unevaluated, config)
    assert ModelCard(text).data.base_model == "Qwen/Qwen3.5-2B"
    assert "| false refusal, matched harmless | not evaluated |" in text


def _broken_copy(finished_trial: Path, tmp_path: Path, how: str) -> Path:
    trial = tmp_path / f"trial-{how}"
    shutil.copytree(finished_trial, trial)
    if how == "unfinished":
        results = json.loads((trial / "results.json").read_text())
        results["status"] = "running"
        (trial / "results.json").write_text(json.dumps(results))
    elif how == "no-results":
        (trial / "results.json").unlink()
    elif how == "degenerate":
        stored = load_directions(trial / "directions.safetensors")
        save_directions(
            trial / "directions.safetensors",
            Directions(torch.zeros(0, stored.vectors.shape[1]), [], stored.layer, [], degenerate=9),
        )
    return trial


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", r"is not a directory"),
        ("no-results", r"has no results\.json: not a trial directory"),
        ("unfinished", r"status='running'; only a complete trial can be exported"),
        ("degenerate", r"all 9 directions at layer 1 were degenerate .* nothing to export"),
    ],
)
def test_bad_trial_dir_is_one_error_line_and_writes_nothing(
    finished_trial, tmp_path, capsys, how, message
):
    trial = tmp_path / "absent" if how == "missing" else _broken_copy(finished_trial, tmp_path, how)
    before = sorted(p.name for p in trial.iterdir()) if trial.exists() else None
    out = tmp_path / "out-folder"
    assert main([str(trial), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()
    assert (sorted(p.name for p in trial.iterdir()) if trial.exists() else None) == before


def test_a_bad_recipe_in_a_trials_config_is_one_error_line_for_export_and_chat(
    finished_trial, tmp_path, capsys
):
    """A trial's config read back is not checked by the schema: an embedded model whose
    model.recipe no recipe has (a hand-edited file, another version's recipe), in a trial that
    records no model identity (so the recipe is what is loaded), is one clear line naming the
    value and the valid ones, exit 2, no traceback and nothing built, from export and chat."""
    from abliterate.chat import main as chat_main

    trial = _broken_copy(finished_trial, tmp_path, "bad-recipe")
    results = json.loads((trial / "results.json").read_text())
    results["config"]["model"].update(source="embedded", recipe="v99")
    results["config"]["paths"]["cache_dir"] = str(tmp_path / "cache")
    del results["provenance"]["model_identity"]
    (trial / "results.json").write_text(json.dumps(results))
    expected = "error: model.recipe='v99' is not valid; choose one of v9, v10, v11, v12, v13, v14, v15, v16"
    out = tmp_path / "out-folder"
    assert main([str(trial), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the line before it warns that the trial records no model identity (an older trial)
    assert err[-1] == expected and err[0].startswith("warning: ") and len(err) == 2, err
    assert not out.exists()
    assert chat_main([str(trial), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == expected and len(err) == 2, err
    assert not (tmp_path / "cache").exists()  # no build started


def test_cli_errors_through_the_interpreter(finished_trial, tmp_path):
    """The real command line: an existing --out, and --push-to-hub offline, each one line,
    before any weights load, nothing written."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    env_command = [sys.executable, "-m", "abliterate.export", str(finished_trial)]
    first = subprocess.run(
        [*env_command, "--out", str(taken)], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 2
    assert (
        first.stderr.strip()
        == f"error: {taken} already exists; choose another --out or pass --overwrite"
    )
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    push = subprocess.run(
        [*env_command, "--out", str(tmp_path / "new"), "--push-to-hub", "someone/tiny"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert push.returncode == 2
    assert push.stderr.strip().startswith("error: --push-to-hub someone/tiny needs the network")
    assert len(push.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_export_refuses_weights_other_than_the_trials(tiny_model_dir, tmp_path, capsys):
    """results.json records the model's identity; export checks the weights it loads against it
    (a model folder changed after the trial is refused unless --any-weights), and a trial from
    before the identity was recorded is exported with a warning."""
    model_dir = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = compose_trial(model_dir, tmp_path, "logger=none")
    results = run_trial(cfg, session=Session())
    trial = tmp_path / "out"
    assert results["provenance"]["model_identity"].startswith(f"hub-dir:{model_dir.resolve()}:")

    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    capsys.readouterr()
    assert main([str(trial), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one the trial edited" in err[0], err
    assert "pass --any-weights" in err[0] and not (tmp_path / "a").exists()
    assert main([str(trial), "--out", str(tmp_path / "a"), "--any-weights"]) == 0
    assert "warning: the model at model.path=" in capsys.readouterr().err

    older = json.loads((trial / "results.json").read_text())
    del older["provenance"]["model_identity"]
    (trial / "results.json").write_text(json.dumps(older))
    assert main([str(trial), "--out", str(tmp_path / "b")]) == 0
    assert "records no model identity (an older trial)" in capsys.readouterr().err


def test_out_that_is_or_contains_the_trial_is_refused_even_with_overwrite(
    finished_trial, tmp_path, capsys
):
    """--out TRIAL_DIR (or a folder above it) with --overwrite used to delete the trial's records
    (results.json, directions, completions; or the whole sweep) to put the model there."""
    trial = tmp_path / "sweep" / "0"
    shutil.copytree(finished_trial, trial)
    before = sorted(p.name for p in trial.iterdir())
    for out in (trial, trial.parent, Path(os.path.relpath(trial.parent, Path.cwd()))):
        assert main([str(trial), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is the trial directory or contains it" in err[0], err
        assert sorted(p.name for p in trial.iterdir()) == before
    assert not list((tmp_path / "sweep").glob(".*partial*"))


def test_device_option_wins_over_the_trials_device_map(finished_trial, tmp_path, monkeypatch):
    """--device cpu loads the model on that one device: a trial run with model.device_map=auto
    would otherwise have accelerate place it on the GPUs again (device_map ignores model.device)."""
    import abliterate.export as export

    trial = tmp_path / "trial"
    shutil.copytree(finished_trial, trial)
    results = json.loads((trial / "results.json").read_text())
    results["config"]["model"]["device_map"] = "auto"
    (trial / "results.json").write_text(json.dumps(results))
    seen = []

    def recording_load_model(cfg, cache_dir):
        seen.append((cfg.device, cfg.device_map))
        raise OSError("stopped here")

    monkeypatch.setattr(export, "load_model", recording_load_model)
    assert main([str(trial), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert main([str(trial), "--out", str(tmp_path / "b")]) == 2
    assert seen[0] == ("cpu", None)
    assert seen[1][1] == "auto"  # without --device, the trial's own placement


def test_hub_trial_is_exported_from_the_commit_it_edited(finished_trial, tmp_path, monkeypatch):
    """A hub model is loaded at the commit results.json records, not at the branch's head: a repo
    that moved on since the trial would otherwise export (or be refused as) other weights."""
    import abliterate.export as export

    trial = tmp_path / "trial"
    shutil.copytree(finished_trial, trial)
    results = json.loads((trial / "results.json").read_text())
    results["config"]["model"]["path"] = "some-org/some-model"
    results["provenance"]["model_identity"] = "hub:some-org/some-model@0123abcd"
    (trial / "results.json").write_text(json.dumps(results))
    seen = []

    def recording_load_model(cfg, cache_dir):
        seen.append(cfg.revision)
        raise OSError("stopped here")

    monkeypatch.setattr(export, "load_model", recording_load_model)
    assert main([str(trial), "--out", str(tmp_path / "a")]) == 2
    assert seen == ["0123abcd"]
