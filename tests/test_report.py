"""The sweep report: synthetic results.json trees with known answers (Petrov's shape: unmatched
reaches zero refusals on some layers, matched never does), incomplete trials, and a real Hydra
multirun of a tiny model (with W&B offline, the default logger) reported end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from abliterate import report

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ["hacking_cybersecurity", "self_harm", "violence_weapons"]
LAYERS = [8, 9, 10, 11]
WEIGHTS = [0.3, 0.5, 0.8, 1.2]
PLOTS = ("refusal_vs_layer.png", "kl_vs_weight.png", "norm_ratio_by_layer.png",
         "direction_cosines.png")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tiny_models import single_torch_thread

    with single_torch_thread():
        yield


def unmatched_refusals(layer: int, weight: float) -> int:
    """Zero from w=0.5 on layer 9, from w=0.8 on layer 11; never on 8 and 10."""
    first_zero = {9: 0.5, 11: 0.8}.get(layer)
    if first_zero is not None and weight >= first_zero:
        return 0
    return max(1, round(10 - 8 * weight))


def fake_results(baseline: str, layer: int, weight: float, refusals: int, *,
                 orthogonalize: str = "none", seed: int = 0) -> dict:  # fmt: skip
    kl = 0.01 * weight**2 * (1 + layer / 10)
    cosines = [[1.0 if i == j else 0.9 - 0.1 * abs(i - j) for j in range(3)] for i in range(3)]
    return {
        "schema_version": 1,
        "status": "complete",
        "trial": {
            "model": "org/tiny", "model_name": "tiny", "baseline": baseline,
            "extraction": "som_per_class", "orthogonalize": orthogonalize, "layer": layer,
            "weight": weight, "scope": "all", "combine": "merged", "direction_norm": "unit",
            "norm_preserving": False, "embeddings": False, "mode": "weights", "num_layers": 24,
            "seed": seed,
        },
        "directions": {"count": 3, "norms": [1.0, 2.0, 3.0], "degenerate": 0,
                       "labels": CATEGORIES},
        "baseline_eval": {"refusal_rate": 1.0, "harmless_refusal_rate": 0.0,
                          "matched_harmless_refusal_rate": 0.1},
        "eval": {
            "n_harmful": 10, "refusals": refusals, "baseline_refusals": 10,
            "refusal_rate": refusals / 10, "evasive_rate": 0.0, "comply_rate": 1 - refusals / 10,
            "refusal_rate_by_category": {c: refusals / 10 for c in CATEGORIES},
            "harmless_refusal_rate": 0.0, "matched_harmless_refusal_rate": 0.1,
            "kl_divergence": kl, "kl_tokens": 1, "efficiency": (10 - refusals) / max(kl, 1e-3),
        },
        "geometry": {
            "norm_ratio_matched_to_unmatched": 0.1 + 0.01 * layer,
            "cos_matched_unmatched": 0.3, "cos_topic_unmatched": 0.9,
            "direction_cosines": cosines, "cosine_to_diff_in_means": [0.8, 0.7, 0.6],
            "capture": 0.69 if baseline == "unmatched" else 0.60, "perturbation_ratio": 0.1,
        },
        "timing_s": {"load": 1.0, "activations": 1.0, "directions": 1.0, "ablation": 1.0,
                     "evaluation": 1.0, "total": 5.0},
        "cache": {"activations": "hit"},
    }  # fmt: skip


def write_trial(sweep: Path, name: str, results: dict | None, raw: str | None = None) -> Path:
    directory = sweep / name
    (directory / ".hydra").mkdir(parents=True)
    if results is not None:
        (directory / "results.json").write_text(json.dumps(results))
    elif raw is not None:
        (directory / "results.json").write_text(raw)
    return directory


@pytest.fixture()
def synthetic_sweep(tmp_path):
    """unmatched, matched and matched+SVD over LAYERS x WEIGHTS, plus three incomplete trials."""
    sweep = tmp_path / "sweep"
    job = 0
    for baseline, orthogonalize in (("unmatched", "none"), ("matched", "none"), ("matched", "svd")):
        for layer in LAYERS:
            for weight in WEIGHTS:
                if baseline == "unmatched":
                    refusals = unmatched_refusals(layer, weight)
                else:
                    refusals = 9 if orthogonalize == "none" and layer == 10 else 10
                name = f"{job}_baseline={baseline},layer={layer},w={weight}"
                write_trial(sweep, name, fake_results(baseline, layer, weight, refusals,
                                                      orthogonalize=orthogonalize))  # fmt: skip
                job += 1
    write_trial(sweep, f"{job}_killed", None)
    write_trial(sweep, f"{job + 1}_running", {"status": "running"})
    write_trial(sweep, f"{job + 2}_corrupt", None, raw='{"status": "compl')
    return sweep


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_table1_lists_zero_refusal_layers_with_minimum_weight(synthetic_sweep):
    results, incomplete = report.collect_results(synthetic_sweep)
    assert len(results) == 3 * len(LAYERS) * len(WEIGHTS) and len(incomplete) == 3
    rows = report.zero_refusal_rows(results, report.Settings(results))
    unmatched = [r for r in rows if r["setting"] == "unmatched"]
    assert [(r["layer"], r["weight"]) for r in unmatched] == [(9, 0.5), (11, 0.8)]
    assert unmatched[0]["kl_divergence"] == pytest.approx(0.01 * 0.25 * 1.9)
    assert unmatched[0]["efficiency"] == pytest.approx(10 / (0.01 * 0.25 * 1.9))
    (matched,) = [r for r in rows if r["setting"] == "matched"]
    assert not matched["reached"] and matched["refusals"] == 9 and matched["layer"] == 10
    assert matched["weight"] == 0.3  # fewest refusals, then lowest KL
    (svd,) = [r for r in rows if r["setting"] == "matched +SVD"]
    assert not svd["reached"] and svd["refusals"] == 10


def test_report_writes_tables_plots_and_lists_incomplete_trials(synthetic_sweep, capsys):
    code = report.main([str(synthetic_sweep)])
    assert code == 1  # incomplete trials
    printed = capsys.readouterr().out
    markdown = (synthetic_sweep / "report.md").read_text()
    assert "## Table 1" in markdown and "## Table 2" in markdown and "## Table 3" in markdown
    assert "not reached (best R = 9/10 at layer 10, w=0.3)" in markdown
    for name, why in (("killed", "no results.json"), ("running", "status='running'"),
                      ("corrupt", "unreadable")):  # fmt: skip
        assert any(name in line and why in line for line in markdown.splitlines()), name
        assert name in printed
    assert "wrote:" in printed and str(synthetic_sweep / "report.md") in printed

    assets = synthetic_sweep / "report"
    table1 = read_csv(assets / "table1_zero_refusal.csv")
    assert [(r["setting"], r["layer"], r["weight"]) for r in table1 if r["reached"] == "True"] == [
        ("unmatched", "9", "0.5"), ("unmatched", "11", "0.8")]  # fmt: skip

    # Table 2, one grid per baseline x orthogonalization
    grids = sorted(p.name for p in assets.glob("table2_refusals_*.csv"))
    assert grids == ["table2_refusals_matched.csv", "table2_refusals_matched_svd.csv",
                     "table2_refusals_unmatched.csv"]  # fmt: skip
    grid = read_csv(assets / "table2_refusals_unmatched.csv")
    assert [row["layer"] for row in grid] == [str(layer) for layer in LAYERS]
    for row in grid:
        for weight in WEIGHTS:
            expected = unmatched_refusals(int(row["layer"]), weight)
            assert float(row[f"w={weight:g}"]) == expected
    assert "| 9     | 8     | 0     | 0     | 0     |" in markdown

    # Table 3: norm ratio by layer and each setting's capture
    geometry = read_csv(assets / "table3_geometry_by_layer.csv")
    assert [float(r["norm_ratio_matched_to_unmatched"]) for r in geometry] == pytest.approx(
        [0.1 + 0.01 * layer for layer in LAYERS]
    )
    assert float(geometry[0]["capture unmatched"]) == pytest.approx(0.69)
    assert float(geometry[0]["capture matched +SVD"]) == pytest.approx(0.60)

    trials = read_csv(synthetic_sweep / "report.csv")
    assert len(trials) == 48 and {"eval.refusals", "trial.layer", "dir"} <= set(trials[0])

    for name in PLOTS:
        with Image.open(assets / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300
        assert f"(report/{name})" in markdown


def test_duplicate_cells_are_averaged_and_settings_named_by_what_varies(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, refusals in ((0, 2), (1, 3)):
        results = fake_results("unmatched", 9, 1.0, refusals, seed=seed)
        write_trial(sweep, f"seed{seed}", results)
    results = fake_results("unmatched", 9, 1.0, 0)
    results["trial"]["scope"] = "layer"
    write_trial(sweep, "scope_layer", results)
    collected, _ = report.collect_results(sweep)
    settings = report.Settings(collected)
    assert sorted(settings.label(k) for k in settings.keys) == [
        "unmatched scope=all", "unmatched scope=layer"]  # fmt: skip
    all_scope = [r for r in collected if r["trial"]["scope"] == "all"]
    assert report.refusal_grid(all_scope)[2][(9, 1.0)] == 2.5
    markdown, written, incomplete = report.write_report(sweep)
    assert not incomplete and "| 9     | 2.5 |" in markdown


def test_empty_directory_reports_no_trials(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "No complete trials" in (tmp_path / "report.md").read_text()
    assert report.main([str(tmp_path / "missing")]) == 2


def test_nan_values_do_not_break_tables_or_plots(tmp_path):
    sweep = tmp_path / "sweep"
    results = fake_results("matched", 3, 1.0, 10)
    results["geometry"]["capture"] = None  # NaN in results.json is null
    results["geometry"]["direction_cosines"] = []
    results["eval"]["kl_divergence"] = 0.0
    write_trial(sweep, "a", results)
    markdown, written, _ = report.write_report(sweep)
    assert "n/a" in markdown and all(p.exists() for p in written)


def wandb_inspect(run_dir: Path, *flags: str) -> str:
    executable = Path(sys.executable).with_name("wandb")
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "wandb"]
    done = subprocess.run([*command, "leet", "inspect", *flags, "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return done.stdout


def inspect_summary(run_dir: Path) -> dict:
    return json.loads(wandb_inspect(run_dir, "--summary"))


def inspect_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in wandb_inspect(run_dir).splitlines() if line.strip()]


EXPERIMENT = """# @package _global_
defaults:
  - override /model: hub
  - override /eval: quick
model: {{path: {model}, name: tiny-llama, default_layer: 1, dtype: float32, device: cpu}}
eval: {{max_new_tokens: 8}}
extraction: {{iterations: 200}}
data:
  harmful_train: {{per_category: 4}}
  matched_train: {{per_category: 4}}
  unmatched_train: {{limit: 24}}
paths: {{cache_dir: {cache}}}
"""


@pytest.fixture(scope="module")
def tiny_multirun(tmp_path_factory):
    """`python run.py -m` over baseline x layer x weight on a tiny saved model: 12 trials in one
    process, logged to W&B offline (the default logger)."""
    from conftest import build_char_tokenizer
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("multirun")
    model_dir = root / "tiny-llama"
    model = build_tiny_model("llama", seed=0)
    tokenizer = build_char_tokenizer()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (root / "conf" / "experiment").mkdir(parents=True)
    (root / "conf" / "experiment" / "tiny_report.yaml").write_text(
        EXPERIMENT.format(model=model_dir, cache=root / "cache")
    )
    sweep = root / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_SILENT="true", WANDB_CONFIG_DIR=str(root / "wandb-config"))  # fmt: skip
    command = [
        sys.executable, "run.py", "-m", "--config-dir", str(root / "conf"),
        "experiment=tiny_report", f"hydra.sweep.dir={sweep}",
        "baseline=matched,unmatched", "layer=0,1,2", "ablation.weight=0.5,1.0",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sweep


def test_report_of_a_real_tiny_multirun(tiny_multirun, capsys):
    sweep = tiny_multirun
    code = report.main([str(sweep)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results, incomplete = report.collect_results(sweep)
    assert len(results) == 12 and not incomplete
    assert {(r["trial"]["baseline"], r["trial"]["layer"], r["trial"]["weight"]) for r in results} == {
        (b, layer, w) for b in ("matched", "unmatched") for layer in (0, 1, 2) for w in (0.5, 1.0)
    }  # fmt: skip
    markdown = (sweep / "report.md").read_text()
    assert "12 complete trials, 0 incomplete, 2 settings." in markdown
    for name in ("table2_refusals_matched.csv", "table2_refusals_unmatched.csv"):
        grid = read_csv(sweep / "report" / name)
        assert [row["layer"] for row in grid] == ["0", "1", "2"]
        assert set(grid[0]) == {"layer", "w=0.5", "w=1"}
    for name in PLOTS:
        with Image.open(sweep / "report" / name) as image:
            assert image.format == "PNG"
    # every trial's W&B run is grouped under the sweep's directory and finished cleanly
    run_dirs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(run_dirs) == 12
    for run_dir in run_dirs[:2]:
        (run,) = [r["run"] for r in inspect_records(run_dir) if r["type"] == "run"]
        assert run["run_group"] == str(sweep)[-128:]
        summary = inspect_summary(run_dir)
        assert summary["state"] == "finished" and "eval/refusal_rate" in summary["summary"]
        trial_dir = run_dir.parents[1]
        results = json.loads((trial_dir / "results.json").read_text())
        assert summary["config"]["trial"] == results["trial"]
        assert not math.isnan(summary["summary"]["eval/kl_divergence"])
