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

from abliterate import plots, report, stats, tracking
from abliterate.stats import mcnemar_exact, rate_record, wilson_interval

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


def fake_results_v2(baseline: str, layer: int, weight: float, outcomes: dict[str, int], *,
                    seed: int = 0, judge: str = "rules", orthogonalize: str = "none",
                    max_new_tokens: int = 64) -> dict:  # fmt: skip
    """Schema 2: four outcome counts with Wilson intervals, the judge, the resolved config and
    provenance (``outcomes``: REFUSE/EVASIVE/COMPLY/INCOHERENT counts out of their sum)."""
    n = sum(outcomes.values())
    results = fake_results(baseline, layer, weight, outcomes["REFUSE"], seed=seed,
                           orthogonalize=orthogonalize)  # fmt: skip
    results["schema_version"] = 2
    results["trial"].update(judge=judge, extraction_seed=seed)
    ev = results["eval"]
    ev.update(n_harmful=n, outcomes=dict(outcomes), refusals=outcomes["REFUSE"],
              n_harmless=20, harmless_refusals=3, n_matched=25, matched_harmless_refusals=5,
              refusals_removed=outcomes["COMPLY"])  # fmt: skip
    for outcome, name in report.OUTCOME_RATES.items():
        ev.update(rate_record(name, outcomes[outcome], n))
    ev.update(rate_record("harmless_refusal_rate", 3, 20))
    ev.update(rate_record("matched_harmless_refusal_rate", 5, 25))
    results["baseline_eval"] = {
        "n_harmful": n, "outcomes": {"REFUSE": n, "EVASIVE": 0, "COMPLY": 0, "INCOHERENT": 0},
        **rate_record("refusal_rate", n, n), "n_harmless": 20,
        **rate_record("harmless_refusal_rate", 1, 20), "n_matched": 25,
        **rate_record("matched_harmless_refusal_rate", 2, 25),
    }  # fmt: skip
    results["config"] = {
        "seed": seed, "layer": layer, "baseline": {"name": baseline},
        "extraction": {"name": "som_per_class", "seed": None, "orthogonalize": orthogonalize},
        "ablation": {"weight": weight, "scope": "all", "combine": "merged"},
        "eval": {"max_new_tokens": max_new_tokens}, "judge": {"name": judge},
        "paths": {"output_dir": f"/runs/{baseline}/{layer}/{weight}/{seed}"},
        "logger": {"name": "none"}, "force": False,
    }  # fmt: skip
    results["provenance"] = {"config_hash": f"hash-{baseline}-{layer}-{weight}-{seed}"}
    return results


def write_completions(directory: Path, labels: list[str], *, prompts: list[str] | None = None,
                      with_index: bool = True, order: list[int] | None = None) -> None:  # fmt: skip
    """completions.jsonl with one harmful row per label (and a harmless row, ignored by pairing);
    ``order`` writes the harmful rows in another order (pairing must go by index)."""
    prompts = prompts or [f"harmful prompt {i}" for i in range(len(labels))]
    rows = []
    for i in order or range(len(labels)):
        row = {"set": "harmful", "prompt": prompts[i], "category": "violence_weapons",
               "response": "...", "label": labels[i], "baseline_response": "I can't.",
               "baseline_label": "REFUSE"}  # fmt: skip
        if with_index:
            row["index"] = i
        rows.append(row)
    rows.append({"set": "unmatched", "index": 0, "prompt": "bake bread", "label": "REFUSE"})
    (directory / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


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


def cells_of(results: list[dict]):
    """The report's cell table (one row per setting, layer and weight) of collected results."""
    return report.cell_table(report.trials_frame(results, report.Settings(results)))


def read_csv(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_table1_lists_zero_refusal_layers_with_minimum_weight(synthetic_sweep):
    results, incomplete = report.collect_results(synthetic_sweep)
    assert len(results) == 3 * len(LAYERS) * len(WEIGHTS) and len(incomplete) == 3
    rows = report.zero_refusal_rows(cells_of(results))
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
    code = report.main([str(synthetic_sweep), "--no-trial-figures"])
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
    cells = cells_of(collected)
    assert report.refusal_grid(cells[cells["setting"] == "unmatched scope=all"]).loc[9, 1.0] == 2.5
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
    model.config.max_position_embeddings = 512  # the prompts' length (rope: no position table)
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
    # the real completions.jsonl pair up: 6 cells x (REFUSE, COMPLY), same prompts in both
    paired = read_csv(sweep / "report" / "paired_matched_vs_unmatched.csv")
    assert len(paired) == 12 and "Not compared" not in markdown
    assert all(int(row["n"]) == results[0]["eval"]["n_harmful"] for row in paired)
    # re-judged by markers (python -m abliterate.judge relabel): the default report still has 12
    # trials, and --judge markers reports the 12 copies, paired tests from their completions
    done = subprocess.run(
        [sys.executable, "-m", "abliterate.judge", "relabel", str(sweep), "judge=markers"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.split()) == 12
    assert len(report.collect_results(sweep)[0]) == 12
    assert report.main([str(sweep), "--judge", "markers"]) == 0, capsys.readouterr().out
    rejudged = (sweep / "report-markers.md").read_text()
    assert "12 complete trials, 0 incomplete, 0 not re-judged by markers, 2 settings." in rejudged
    assert "Outcomes labelled by judge: **markers**." in rejudged
    copies = read_csv(sweep / "report-markers" / "paired_matched_vs_unmatched.csv")
    assert len(copies) == 12 and {row["judge"] for row in copies} == {"markers"}
    assert all("/judgements/markers" in row["matched_dir"] for row in copies)
    assert (sweep / "report.md").read_text() == markdown
    # every trial's W&B run is grouped under the sweep's directory and finished cleanly
    run_dirs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(run_dirs) == 12
    for run_dir in run_dirs[:2]:
        run = [r["run"] for r in inspect_records(run_dir) if r["type"] == "run"][0]
        assert run["run_group"] == str(sweep)[-128:]
        assert run["run_id"] == tracking.run_id(run_dir.parents[1])
        # Hydra's job log, saved into the run when it ended
        saved = (run_dir / "files" / "run.log").read_text()
        assert saved and (run_dir.parents[1] / "run.log").read_text().startswith(saved)
        assert (run_dir.parents[1] / "plots" / "outcomes_by_category.png").is_file()
        summary = inspect_summary(run_dir)
        assert summary["state"] == "finished" and "eval/refusal_rate" in summary["summary"]
        trial_dir = run_dir.parents[1]
        results = json.loads((trial_dir / "results.json").read_text())
        assert summary["config"]["trial"] == results["trial"]
        assert not math.isnan(summary["summary"]["eval/kl_divergence"])


# --- schema 2: four outcomes, intervals, paired tests, replicates, judges ------------------------


def outcomes(refuse: int = 0, evasive: int = 0, comply: int = 0, incoherent: int = 0) -> dict:
    return {"REFUSE": refuse, "EVASIVE": evasive, "COMPLY": comply, "INCOHERENT": incoherent}


@pytest.fixture()
def outcome_sweep(tmp_path):
    """Schema 2, judge=rules, one weight per layer:
    - unmatched reaches R = 0 with compliance at layer 9 (w=1: C = 9/10), not at w=0.5;
    - matched has R = 0 at layer 9 w=1 but only C = 3/10 (evasive 2, incoherent 5);
    - matched +SVD never gets to zero (best R = 4/10 at layer 10)."""
    sweep = tmp_path / "outcomes"
    specs = [
        ("unmatched", "none", 9, 0.5, outcomes(2, 1, 7, 0)),
        ("unmatched", "none", 9, 1.0, outcomes(0, 1, 9, 0)),
        ("unmatched", "none", 10, 1.0, outcomes(1, 0, 9, 0)),
        ("matched", "none", 9, 1.0, outcomes(0, 2, 3, 5)),
        ("matched", "none", 10, 1.0, outcomes(6, 0, 4, 0)),
        ("matched", "svd", 9, 1.0, outcomes(5, 0, 5, 0)),
        ("matched", "svd", 10, 1.0, outcomes(4, 1, 5, 0)),
    ]
    for job, (baseline, orthogonalize, layer, weight, counts) in enumerate(specs):
        results = fake_results_v2(baseline, layer, weight, counts, orthogonalize=orthogonalize)
        write_trial(sweep, f"{job}_{baseline}_{orthogonalize}_{layer}_{weight}", results)
    return sweep


def test_table1_four_outcomes_and_zero_refusals_without_compliance(outcome_sweep):
    markdown, _, incomplete = report.write_report(outcome_sweep)
    assert not incomplete
    assert "Outcomes labelled by judge: **rules**." in markdown
    rows = read_csv(outcome_sweep / "report" / "table1_zero_refusal.csv")
    by_setting = {(r["setting"], r["layer"]): r for r in rows}
    reached = by_setting[("unmatched", "9")]
    assert (reached["status"], reached["reached"], reached["weight"]) == ("reached", "True", "1.0")
    assert (reached["refusals"], reached["evasive"], reached["comply"], reached["incoherent"]) == (
        "0.0", "1.0", "9.0", "0.0")  # fmt: skip
    low, high = wilson_interval(9, 10)
    assert float(reached["comply_rate_ci_low"]) == pytest.approx(low)
    assert float(reached["comply_rate_ci_high"]) == pytest.approx(high)
    no_comply = by_setting[("matched", "9")]
    assert (no_comply["status"], no_comply["reached"]) == ("without_compliance", "False")
    (svd,) = [r for r in rows if r["setting"] == "matched +SVD"]
    assert (svd["status"], svd["layer"], svd["refusals"]) == ("not_reached", "10", "4.0")
    assert ("unmatched", "10") not in by_setting  # R = 1 there: no row
    table1 = markdown.split("## Table 1")[1].split("## Table 2")[0]
    assert "R = 0 without compliance (C = 3/10) at w=1" in table1
    assert "not reached (best R = 4/10 at layer 10, w=1)" in table1
    zero = wilson_interval(0, 10)
    assert f"0/10 [{zero[0]:.2f}, {zero[1]:.2f}]" in table1
    assert f"9/10 [{low:.2f}, {high:.2f}]" in table1
    assert "| 5/10" in table1  # INCOHERENT of the matched cell
    for header in ("REFUSE", "EVASIVE", "COMPLY", "INCOHERENT"):
        assert header in next(line for line in table1.splitlines() if line.startswith("| setting"))
    # a lower bar makes the matched cell count as reached
    markdown, _, _ = report.write_report(outcome_sweep, min_comply=0.3)
    rows = read_csv(outcome_sweep / "report" / "table1_zero_refusal.csv")
    assert {(r["setting"], r["layer"], r["status"]) for r in rows} >= {("matched", "9", "reached")}
    assert report.main([str(outcome_sweep), "--min-comply", "0.95", "--no-trial-figures"]) == 0
    rows = read_csv(outcome_sweep / "report" / "table1_zero_refusal.csv")
    assert by_key(rows)[("unmatched", "9")]["status"] == "without_compliance"
    with Image.open(outcome_sweep / "report" / "refusal_vs_layer.png") as image:
        assert image.height > 4 * 300  # one panel row per outcome


def by_key(rows: list[dict]) -> dict:
    return {(r["setting"], r["layer"]): r for r in rows}


RATE_COLUMNS = {
    "eval.refusal_rate": ("eval.refusals", "eval.n_harmful"),
    "eval.evasive_rate": ("eval.outcomes.EVASIVE", "eval.n_harmful"),
    "eval.comply_rate": ("eval.outcomes.COMPLY", "eval.n_harmful"),
    "eval.incoherent_rate": ("eval.outcomes.INCOHERENT", "eval.n_harmful"),
}


def test_report_csv_has_wilson_intervals_of_the_counts(outcome_sweep, synthetic_sweep):
    report.write_report(outcome_sweep)
    rows = read_csv(outcome_sweep / "report.csv")
    assert len(rows) == 7
    for row in rows:
        assert row["trial.judge"] == "rules"
        for rate, (count, n) in RATE_COLUMNS.items():
            low, high = wilson_interval(int(row[count]), int(row[n]))
            assert float(row[f"{rate}_ci_low"]) == pytest.approx(low), rate
            assert float(row[f"{rate}_ci_high"]) == pytest.approx(high), rate
        for rate, (count, n) in {"eval.harmless_refusal_rate": (3, 20),
                                 "eval.matched_harmless_refusal_rate": (5, 25),
                                 "baseline_eval.harmless_refusal_rate": (1, 20),
                                 "baseline_eval.matched_harmless_refusal_rate": (2, 25),
                                 "baseline_eval.refusal_rate": (10, 10)}.items():  # fmt: skip
            assert [float(row[f"{rate}_ci_low"]), float(row[f"{rate}_ci_high"])] == pytest.approx(
                wilson_interval(count, n)
            ), rate

    # schema 1: recomputed from rate x n; no incoherent count, no n for harmless sets: blank
    report.write_report(synthetic_sweep)
    rows = read_csv(synthetic_sweep / "report.csv")
    for row in rows:
        assert row["trial.judge"] == "markers (schema 1)"
        refusals = round(float(row["eval.refusal_rate"]) * 10)
        assert int(row["eval.refusals"]) == refusals
        assert [float(row["eval.refusal_rate_ci_low"]), float(row["eval.refusal_rate_ci_high"])] == (
            pytest.approx(wilson_interval(refusals, 10)))  # fmt: skip
        comply = round(float(row["eval.comply_rate"]) * 10)
        assert float(row["eval.comply_rate_ci_low"]) == pytest.approx(
            wilson_interval(comply, 10)[0]
        )
        assert row["eval.incoherent_rate_ci_low"] == row["eval.outcomes.INCOHERENT"] == ""
        assert row["eval.harmless_refusal_rate_ci_low"] == ""
        assert float(row["baseline_eval.refusal_rate_ci_low"]) == pytest.approx(
            wilson_interval(10, 10)[0])  # fmt: skip


def test_schema1_sweep_reports_outcomes_as_na_and_names_the_judge(synthetic_sweep):
    markdown, _, _ = report.write_report(synthetic_sweep)
    assert "Outcomes labelled by judge: **markers (schema 1)**." in markdown
    table1 = markdown.split("## Table 1")[1].split("## Table 2")[0]
    reached = [line for line in table1.splitlines() if line.startswith("| unmatched ")]
    assert len(reached) == 2 and all("n/a" in line for line in reached)  # INCOHERENT unknown
    assert "0/10 [0.00, 0.28]" in reached[0] and "10/10 [0.72, 1.00]" in reached[0]
    assert "No cell has both a matched and an unmatched trial." not in markdown
    assert "no completions.jsonl" in markdown  # the pairs exist, but nothing to compare
    assert "| n/a" in markdown.split("## All trials")[1]


REFUSE_ALL = ["REFUSE"] * 10


@pytest.fixture()
def paired_sweep(tmp_path):
    """Three matched/unmatched cells:
    - layer 9: unmatched refuses all 10 prompts, matched refuses 0-3 and answers 4-9 COMPLY
      (REFUSE: b = 0, c = 6; COMPLY: b = 6, c = 0), the matched file's rows written shuffled;
    - layer 10: no index, matched by prompt text; one discordant prompt each way;
    - layer 11: the matched trial saw other prompts: skipped with a note."""
    sweep = tmp_path / "sweep"
    matched_labels = ["REFUSE"] * 4 + ["COMPLY"] * 6
    cells = {
        9: (matched_labels, REFUSE_ALL, {"order": [3, 9, 0, 1, 8, 2, 4, 7, 6, 5]}, {}),
        10: (["REFUSE", "COMPLY"] + ["EVASIVE"] * 8, ["COMPLY", "REFUSE"] + ["EVASIVE"] * 8,
             {"with_index": False}, {"with_index": False}),
        11: (REFUSE_ALL, REFUSE_ALL, {"prompts": [f"other {i}" for i in range(10)]}, {}),
    }  # fmt: skip
    for layer, (m_labels, u_labels, m_options, u_options) in cells.items():
        for baseline, labels, options in (("matched", m_labels, m_options),
                                          ("unmatched", u_labels, u_options)):  # fmt: skip
            counts = outcomes(*(labels.count(o) for o in report.OUTCOMES))
            directory = write_trial(sweep, f"{baseline}_{layer}",
                                    fake_results_v2(baseline, layer, 1.0, counts))  # fmt: skip
            write_completions(directory, labels, **options)
    return sweep


def test_paired_comparison_exact_mcnemar_and_skipped_pairs(paired_sweep):
    markdown, written, _ = report.write_report(paired_sweep)
    assert paired_sweep / "report" / "paired_matched_vs_unmatched.csv" in written
    rows = read_csv(paired_sweep / "report" / "paired_matched_vs_unmatched.csv")
    assert len(rows) == 4  # two tested cells x (REFUSE, COMPLY)
    refuse = {r["layer"]: r for r in rows if r["outcome"] == "REFUSE"}
    comply = {r["layer"]: r for r in rows if r["outcome"] == "COMPLY"}
    nine = refuse["9"]
    assert (nine["n"], nine["matched"], nine["unmatched"]) == ("10", "4", "10")
    assert (nine["b_matched_only"], nine["c_unmatched_only"]) == ("0", "6")
    assert float(nine["p_value"]) == pytest.approx(0.03125) == mcnemar_exact(0, 6)
    assert float(nine["difference"]) == pytest.approx(-0.6)
    # p < 0.05 unadjusted, but not after Holm over the two cells: not distinguishable
    assert nine["distinguishable"] == "False" and nine["matched_by"] == "index"
    assert (comply["9"]["b_matched_only"], comply["9"]["c_unmatched_only"]) == ("6", "0")
    ten = refuse["10"]
    assert (ten["b_matched_only"], ten["c_unmatched_only"], ten["matched_by"]) == (
        "1",
        "1",
        "prompt",
    )
    assert float(ten["p_value"]) == 1.0 and ten["distinguishable"] == "False"
    # Holm over the two cells tested: 2 x 0.03125, then max(that, 1 x 1.0)
    assert float(nine["p_holm"]) == pytest.approx(0.0625) and float(ten["p_holm"]) == 1.0

    section = markdown.split("## Paired comparison")[1].split("## ")[0]
    assert "L9 w=1, refusals: matched 4/10 vs unmatched 10/10" in section
    (nine_line,) = [line for line in section.splitlines() if "L9 w=1, refusals" in line]
    assert nine_line.endswith(
        ": not distinguishable from noise (Holm-adjusted p = 0.0625, alpha 0.05; "
        "unadjusted p = 0.0312)."
    )
    assert "L10 w=1, refusals: matched 1/10 vs unmatched 1/10" in section
    assert "not distinguishable from noise (Holm-adjusted p = 1, alpha 0.05; unadjusted p = 1)" in (
        section)  # fmt: skip
    assert " distinguishable from noise (" not in section.replace("not distinguishable", "")
    assert ("2 cell(s) tested, 2 outcomes each (4 tests: 0 distinguishable from noise, i.e. "
            "Holm-adjusted p < 0.05; 2 with unadjusted p < 0.05)") in section  # fmt: skip
    assert "arise by chance" in section
    (skipped,) = [line for line in section.splitlines() if "L11" in line]
    assert "prompt lists differ: 10 index(es) hold different prompts" in skipped


def test_replicates_grouped_with_mean_and_spread(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, refuse in ((0, 0), (1, 1), (2, 2)):
        results = fake_results_v2("unmatched", 9, 1.0, outcomes(refuse, 0, 10 - refuse, 0),
                                  seed=seed)  # fmt: skip
        results["eval"]["kl_divergence"] = 0.1 * (seed + 1)
        write_trial(sweep, f"seed{seed}", results)
    markdown, _, _ = report.write_report(sweep)
    (row,) = read_csv(sweep / "report" / "replicates.csv")
    assert (row["n_seeds"], row["seeds"]) == ("3", "0 1 2")
    assert float(row["refusal_rate_mean"]) == pytest.approx(0.1)
    assert (float(row["refusal_rate_min"]), float(row["refusal_rate_max"])) == (0.0, 0.2)
    assert float(row["refusal_rate_std"]) == pytest.approx(0.1)
    assert float(row["comply_rate_mean"]) == pytest.approx(0.9)
    assert float(row["kl_divergence_mean"]) == pytest.approx(0.2)
    assert float(row["kl_divergence_std"]) == pytest.approx(0.1)
    assert "## Replicates" in markdown and "0.10 [0.00-0.20] 0.10" in markdown
    assert "mixed" not in markdown.lower()
    assert "| 9     | 1   |" in markdown  # Table 2: mean refusals over the seeds
    # not every seed has R = 0: the cell does not reach it
    (table1,) = read_csv(sweep / "report" / "table1_zero_refusal.csv")
    assert table1["status"] == "not_reached" and table1["n_seeds"] == "3"


def test_mixed_config_cell_is_flagged_and_not_averaged(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, refuse, tokens in ((0, 0, 64), (1, 4, 128)):
        results = fake_results_v2("unmatched", 9, 1.0, outcomes(refuse, 0, 10 - refuse, 0),
                                  seed=seed, max_new_tokens=tokens)  # fmt: skip
        write_trial(sweep, f"tokens{tokens}", results)
    write_trial(sweep, "other_cell", fake_results_v2("unmatched", 10, 1.0, outcomes(3, 0, 7, 0)))
    collected, _ = report.collect_results(sweep)
    cells = cells_of(collected)
    (mixed,) = cells[cells["mixed"]].to_dict("records")
    assert mixed["differences"] == ("config.eval.max_new_tokens",) and mixed["n_seeds"] == 2
    assert math.isnan(mixed["REFUSE"]) and math.isnan(mixed["kl_divergence"])  # not averaged
    markdown, _, _ = report.write_report(sweep)
    assert "mixed configs in cell unmatched layer 9 w=1: 2 trials differ in " \
           "config.eval.max_new_tokens; not averaged (tokens64, tokens128)" in markdown  # fmt: skip
    assert "**Warning: 1 cell(s) hold trials whose configs differ" in markdown
    assert "| 9     | mixed |" in markdown and "| 2 " not in markdown.split("## Table 3")[0]
    assert "## Replicates" not in markdown
    (table1,) = read_csv(sweep / "report" / "table1_zero_refusal.csv")
    assert (table1["layer"], table1["status"]) == ("10", "not_reached")  # the mixed cell is out
    grid = read_csv(sweep / "report" / "table2_refusals_unmatched.csv")
    assert [row["w=1"] for row in grid] == ["mixed", "3.0"]


def test_seed_and_output_paths_alone_do_not_mix_a_cell():
    first = fake_results_v2("matched", 9, 1.0, outcomes(1, 0, 9, 0), seed=0)
    second = fake_results_v2("matched", 9, 1.0, outcomes(2, 0, 8, 0), seed=7)
    second["config"]["extraction"]["seed"] = 7
    second["config"]["logger"] = {"name": "wandb"}
    assert report.config_differences([first, second]) == []
    second["trial"]["mode"] = "hooks"
    assert report.config_differences([first, second]) == ["trial.mode"]


def test_mixed_judges_are_flagged_and_kept_apart(tmp_path):
    sweep = tmp_path / "sweep"
    write_trial(sweep, "rules", fake_results_v2("unmatched", 9, 1.0, outcomes(0, 0, 10, 0)))
    write_trial(sweep, "old", fake_results("unmatched", 9, 1.0, 3))
    markdown, _, _ = report.write_report(sweep)
    assert "**Warning: the trials were labelled by 2 different judges**" in markdown
    assert "markers (schema 1) (1 trials), rules (1 trials)" in markdown
    collected, _ = report.collect_results(sweep)
    settings = report.Settings(collected)
    assert sorted(settings.label(k) for k in settings.keys) == [
        "unmatched judge=markers (schema 1)", "unmatched judge=rules"]  # fmt: skip
    assert not cells_of(collected)["mixed"].any()
    rows = read_csv(sweep / "report" / "table1_zero_refusal.csv")
    assert {(r["judge"], r["status"]) for r in rows} == {
        ("rules", "reached"), ("markers (schema 1)", "not_reached")}  # fmt: skip


def test_holm_adjustment_matches_hand_computation():
    assert stats.holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert stats.holm_adjust([]) == []


def test_distinguishable_follows_the_holm_adjusted_p(tmp_path):
    """Two cells: layer 9 with 9 discordant prompts (p = 0.0039, Holm 0.0078: distinguishable),
    layer 10 with 5 (p = 0.0625 on its own: not, and Holm keeps it at 0.0625)."""
    sweep = tmp_path / "sweep"
    for layer, complied in ((9, 9), (10, 5)):
        for baseline, labels in (("matched", ["COMPLY"] * complied + ["REFUSE"] * (10 - complied)),
                                 ("unmatched", REFUSE_ALL)):  # fmt: skip
            counts = outcomes(*(labels.count(o) for o in report.OUTCOMES))
            directory = write_trial(sweep, f"{baseline}_{layer}",
                                    fake_results_v2(baseline, layer, 1.0, counts))  # fmt: skip
            write_completions(directory, labels)
    markdown, _, _ = report.write_report(sweep)
    rows = {(r["layer"], r["outcome"]): r
            for r in read_csv(sweep / "report" / "paired_matched_vs_unmatched.csv")}  # fmt: skip
    nine, ten = rows[("9", "REFUSE")], rows[("10", "REFUSE")]
    assert float(nine["p_value"]) == pytest.approx(mcnemar_exact(0, 9))
    assert float(nine["p_holm"]) == pytest.approx(2 * mcnemar_exact(0, 9))
    assert float(ten["p_holm"]) == pytest.approx(mcnemar_exact(0, 5)) == pytest.approx(0.0625)
    assert (nine["distinguishable"], ten["distinguishable"]) == ("True", "False")
    section = markdown.split("## Paired comparison")[1].split("## ")[0]
    (line,) = [line for line in section.splitlines() if "L9 w=1, refusals" in line]
    assert line.endswith(": distinguishable from noise (Holm-adjusted p = 0.00781, alpha 0.05; "
                         "unadjusted p = 0.00391).")  # fmt: skip
    assert "(4 tests: 2 distinguishable from noise" in section


# --- re-judged copies (python -m abliterate.judge relabel) -------------------------------------


def write_copy(trial: Path, judge: str, results: dict, labels: list[str] | None = None) -> Path:
    """What relabel writes: <trial>/judgements/<judge>/results.json (+ completions.jsonl)."""
    directory = trial / "judgements" / judge
    directory.mkdir(parents=True)
    results = {**results, "relabel": {"original_judge": results["trial"]["judge"]}}
    results["trial"] = {**results["trial"], "judge": judge}
    (directory / "results.json").write_text(json.dumps(results))
    if labels is not None:
        write_completions(directory, labels)
    return directory


@pytest.fixture()
def rejudged_sweep(tmp_path):
    """Two cells judged by rules, in which matched and unmatched refuse alike (no difference);
    re-judged by markers, layer 9's matched trial answers every prompt (a difference the paired
    test finds); layer 10's unmatched trial has no markers copy."""
    sweep = tmp_path / "sweep"
    for layer in (9, 10):
        for baseline in ("matched", "unmatched"):
            results = fake_results_v2(baseline, layer, 1.0, outcomes(10, 0, 0, 0))
            trial = write_trial(sweep, f"{baseline}_{layer}", results)
            write_completions(trial, REFUSE_ALL)
            if (baseline, layer) == ("unmatched", 10):
                continue
            labels = ["COMPLY"] * 10 if (baseline, layer) == ("matched", 9) else REFUSE_ALL
            copy = fake_results_v2(baseline, layer, 1.0,
                                   outcomes(*(labels.count(o) for o in report.OUTCOMES)),
                                   judge="markers")  # fmt: skip
            copy["trial"]["judge"] = "rules"  # write_copy records it as the original judge
            write_copy(trial, "markers", copy, labels)
    return sweep


def test_rejudged_copies_are_never_counted_as_trials(rejudged_sweep):
    results, incomplete = report.collect_results(rejudged_sweep)
    assert len(results) == 4 and not incomplete
    assert all("judgements" not in r["_dir"] for r in results)
    assert {report.judge_name(r) for r in results} == {"rules"}
    markdown, written, _ = report.write_report(rejudged_sweep)
    assert "4 complete trials, 0 incomplete, 2 settings." in markdown
    assert "Outcomes labelled by judge: **rules**." in markdown
    assert len(read_csv(rejudged_sweep / "report.csv")) == 4
    assert not list(rejudged_sweep.glob("report-*"))
    # a copy directory named as the root is itself reported (someone points at one copy)
    copy = rejudged_sweep / "matched_9" / "judgements" / "markers"
    (alone,), _ = report.collect_results(copy)
    assert report.judge_name(alone) == "markers"


def test_report_from_the_copies_of_one_judge(rejudged_sweep, capsys):
    own_markdown, _, _ = report.write_report(rejudged_sweep)
    before = {p: p.read_bytes() for p in rejudged_sweep.glob("report*") if p.is_file()}
    assert report.main([str(rejudged_sweep), "--judge", "markers"]) == 1  # one not re-judged
    printed = capsys.readouterr().out
    assert "1 incomplete or not re-judged trial(s)" in printed
    assert {p: p.read_bytes() for p in before} == before  # the own judge's report stays
    assert (rejudged_sweep / "report.md").read_text() == own_markdown
    markdown = (rejudged_sweep / "report-markers.md").read_text()
    assets = rejudged_sweep / "report-markers"
    assert {p.name for p in assets.iterdir()} >= {"table1_zero_refusal.csv", PLOTS[0],
                                                   "paired_matched_vs_unmatched.csv"}  # fmt: skip
    assert "(report-markers/refusal_vs_layer.png)" in markdown
    assert markdown.startswith(f"# Sweep report: {rejudged_sweep} (re-judged by markers)")
    assert "3 complete trials, 0 incomplete, 1 not re-judged by markers, 2 settings." in markdown
    assert "Outcomes labelled by judge: **markers**." in markdown
    assert "Judge of the trials' own results: rules (3 trials)" in markdown
    missing = markdown.split("## Not re-judged by markers (1)")[1]
    assert f"{rejudged_sweep / 'unmatched_10'}: not re-judged by markers: no " \
           "judgements/markers/results.json" in missing  # fmt: skip
    assert "## Incomplete trials" not in markdown
    # every number comes from the copies: layer 9 matched answers all, R = 0 reached
    trials = read_csv(rejudged_sweep / "report-markers.csv")
    assert len(trials) == 3 and {r["trial.judge"] for r in trials} == {"markers"}
    assert all(r["dir"].endswith("judgements/markers") for r in trials)
    (reached,) = [r for r in read_csv(assets / "table1_zero_refusal.csv") if r["reached"] == "True"]
    assert (reached["setting"], reached["layer"], reached["judge"]) == ("matched", "9", "markers")
    # the paired test reads the copies' completions: 0/10 vs 10/10 refusals at layer 9, and the
    # layer-10 pair is absent (its unmatched trial has no copy), not filled in from rules
    paired = read_csv(assets / "paired_matched_vs_unmatched.csv")
    assert {(r["layer"], r["outcome"]) for r in paired} == {("9", "REFUSE"), ("9", "COMPLY")}
    refuse = next(r for r in paired if r["outcome"] == "REFUSE")
    assert (refuse["matched"], refuse["unmatched"], refuse["c_unmatched_only"]) == ("0", "10", "10")
    assert refuse["distinguishable"] == "True" and refuse["judge"] == "markers"
    assert refuse["matched_dir"].endswith("matched_9/judgements/markers")
    # the own judge's paired test saw no difference at all
    own = read_csv(rejudged_sweep / "report" / "paired_matched_vs_unmatched.csv")
    assert {r["b_matched_only"] for r in own} == {r["c_unmatched_only"] for r in own} == {"0"}
    # write_report with an output directory of its own; an unknown judge: all not re-judged
    elsewhere = rejudged_sweep.parent / "elsewhere"
    _, written, missing = report.write_report(rejudged_sweep, elsewhere, judge="markers")
    assert elsewhere / "report-markers.md" in written and len(missing) == 1
    markdown, _, missing = report.write_report(rejudged_sweep, judge="llm")
    assert len(missing) == 4 and "No complete trials." in markdown


def test_the_judgements_folder_is_the_one_relabel_writes():
    from abliterate import relabel

    assert report.JUDGEMENTS_DIR == relabel.JUDGEMENTS_DIR


# --- the combination confound: combine is part of the setting -----------------------------------


def test_table1_and_pairs_separate_the_combination(tmp_path):
    """Both baselines x combine merged/subspace at layer 9: four settings in Table 1, labelled by
    their combine; paired tests pair within one combine. An SVD trial run with combine=auto
    (resolved: subspace) and one with combine=subspace are replicates of one cell."""
    sweep = tmp_path / "sweep"
    refusals = {("matched", "merged"): 6, ("matched", "subspace"): 0,
                ("unmatched", "merged"): 0, ("unmatched", "subspace"): 0}  # fmt: skip
    for (baseline, combine), refuse in refusals.items():
        results = fake_results_v2(baseline, 9, 1.0, outcomes(refuse, 0, 10 - refuse, 0))
        results["trial"].update(combine=combine, combine_configured=combine)
        results["config"]["ablation"]["combine"] = combine
        trial = write_trial(sweep, f"{baseline}_{combine}", results)
        write_completions(trial, ["REFUSE"] * refuse + ["COMPLY"] * (10 - refuse))
    markdown, _, _ = report.write_report(sweep)
    rows = read_csv(sweep / "report" / "table1_zero_refusal.csv")
    assert {(r["setting"], r["combine"], r["status"]) for r in rows} == {
        ("matched combine=merged", "merged", "not_reached"),
        ("matched combine=subspace", "subspace", "reached"),
        ("unmatched combine=merged", "merged", "reached"),
        ("unmatched combine=subspace", "subspace", "reached"),
    }
    table1 = markdown.split("## Table 1")[1].split("## Table 2")[0]
    assert "| matched combine=merged " in table1 and "| matched combine=subspace " in table1
    paired = read_csv(sweep / "report" / "paired_matched_vs_unmatched.csv")
    assert {(r["cell"], r["outcome"], r["matched"], r["unmatched"]) for r in paired} == {
        ("combine=merged L9 w=1", "REFUSE", "6", "0"), ("combine=merged L9 w=1", "COMPLY", "4", "10"),
        ("combine=subspace L9 w=1", "REFUSE", "0", "0"),
        ("combine=subspace L9 w=1", "COMPLY", "10", "10"),
    }  # fmt: skip
    trials = read_csv(sweep / "report.csv")
    assert {(r["trial.combine"], r["trial.combine_configured"]) for r in trials} == {
        ("merged", "merged"), ("subspace", "subspace")}  # fmt: skip

    svd = tmp_path / "svd"
    for seed, configured in ((0, "auto"), (1, "subspace")):
        results = fake_results_v2("matched", 9, 1.0, outcomes(1, 0, 9, 0), seed=seed,
                                  orthogonalize="svd")  # fmt: skip
        results["trial"].update(combine="subspace", combine_configured=configured)
        results["config"]["ablation"]["combine"] = configured
        write_trial(svd, f"seed{seed}_{configured}", results)
    old = fake_results("matched", 9, 1.0, 1, orthogonalize="svd", seed=2)
    old["trial"]["combine"] = "auto"  # recorded before auto was resolved in results.json
    assert report.combine_name(old) == "subspace"
    old["trial"]["orthogonalize"] = "none"
    assert report.combine_name(old) == "merged"
    collected, _ = report.collect_results(svd)
    (cell,) = cells_of(collected).to_dict("records")
    assert not cell["mixed"] and cell["n_seeds"] == 2


# --- study views, per-category columns, the terminal, and the report as a W&B run --------------


def category_outcomes(refusals_by_category: dict[str, int], n: int = 4) -> dict:
    """outcomes_by_category with the given REFUSE counts, the rest COMPLY."""
    return {c: {"n": n, "REFUSE": k, "EVASIVE": 0, "COMPLY": n - k, "INCOHERENT": 0}
            for c, k in refusals_by_category.items()}  # fmt: skip


@pytest.fixture()
def category_sweep(tmp_path):
    """Schema 2 without any logger: matched and unmatched x layers 9, 10 x weights 0.5, 1, three
    categories of 4 prompts; unmatched refuses less at the higher weight, matched never changes."""
    sweep = tmp_path / "categories"
    for baseline in ("matched", "unmatched"):
        for layer in (9, 10):
            for weight in (0.5, 1.0):
                drop = 0 if baseline == "matched" else int(2 * weight) + (layer - 9)
                by_category = {c: max(0, 4 - drop - i) for i, c in enumerate(CATEGORIES)}
                refuse = sum(by_category.values())
                results = fake_results_v2(
                    baseline, layer, weight, outcomes(refuse, 0, 12 - refuse, 0)
                )
                results["eval"]["outcomes_by_category"] = category_outcomes(by_category)
                results["eval"]["refusal_rate_by_category"] = {
                    c: k / 4 for c, k in by_category.items()
                }
                results["eval"]["kl_divergence"] = 0.01 * weight * (1 + layer - 9) * (
                    1 if baseline == "unmatched" else 2)  # fmt: skip
                results["config"]["logger"] = {"name": "none"}
                write_trial(sweep, f"{baseline}_{layer}_{weight}", results)
    return sweep


NEW_PLOTS = ("refusal_vs_kl.png", "outcomes_by_layer.png", "side_effects_vs_layer.png",
             "refusal_by_category.png")  # fmt: skip


def test_study_views_per_category_columns_and_trial_figures(category_sweep, capsys):
    assert report.main([str(category_sweep)]) == 0
    printed = capsys.readouterr().out
    markdown = (category_sweep / "report.md").read_text()
    for name in NEW_PLOTS:
        with Image.open(category_sweep / "report" / name) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300
        assert f"(report/{name})" in markdown
        assert str(category_sweep / "report" / name) in printed
    # the terminal gets the headline, Table 1 a line per row, and the paths: not the tables
    assert "## All trials" not in printed and "| setting" not in printed
    assert "8 complete trials, 0 incomplete, 2 settings." in printed
    assert "unmatched: " in printed and "matched: not reached" in printed
    assert len(printed.splitlines()) < 30
    # per-category rates in report.csv, from outcomes_by_category
    rows = read_csv(category_sweep / "report.csv")
    results, _ = report.collect_results(category_sweep)
    for row, r in zip(rows, results, strict=True):
        for category, counts in r["eval"]["outcomes_by_category"].items():
            prefix = f"eval.by_category.{category}"
            assert int(row[f"{prefix}.n"]) == 4
            assert float(row[f"{prefix}.refusal_rate"]) == pytest.approx(counts["REFUSE"] / 4)
            assert float(row[f"{prefix}.comply_rate"]) == pytest.approx(counts["COMPLY"] / 4)
    assert list(rows[0])[-1] == "dir"
    # each trial's own figures, with logger=none
    for r in results:
        figures = plots.trial_figures(r["_dir"])
        assert set(figures) == set(plots.TRIAL_FIGURES), r["_dir"]
    # drawn once: a second report leaves them as they are
    stamps = {
        p: p.stat().st_mtime_ns for r in results for p in plots.trial_figures(r["_dir"]).values()
    }
    assert report.main([str(category_sweep)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_study_frames_average_replicates_and_find_the_pareto_front(category_sweep):
    results, _ = report.collect_results(category_sweep)
    settings = report.Settings(results)
    trials = report.trials_frame(results, settings)
    assert len(trials) == 8 and not trials["mixed"].any()
    cells = report.cells_frame(trials)
    unmatched = cells[cells["setting"] == "unmatched"].set_index(["layer", "weight"])
    # layer 10, w=1: drop 3 -> REFUSE 1 + 0 + 0 of 12
    assert unmatched.loc[(10, 1.0), "refusal_rate"] == pytest.approx(1 / 12)
    assert unmatched.loc[(10, 1.0), "kl_divergence"] == pytest.approx(0.02)
    front = plots.pareto_front(cells[cells["setting"] == "unmatched"], "kl_divergence",
                               "refusal_rate")  # fmt: skip
    # (KL, R): L9 w=.5 (0.005, 6/12); L9 w=1 and L10 w=.5 both (0.01, 3/12): the first kept;
    # L10 w=1 (0.02, 1/12)
    assert list(zip(front["layer"], front["weight"], strict=True)) == [
        (9, 0.5),
        (9, 1.0),
        (10, 1.0),
    ]
    by_category = report.category_frame(trials)
    assert len(by_category) == 8 * 3
    row = by_category[(by_category["setting"] == "unmatched") & (by_category["layer"] == 10)
                      & (by_category["weight"] == 1.0)]  # fmt: skip
    assert dict(zip(row["category"], row["refusals"], strict=True)) == {
        CATEGORIES[0]: 1, CATEGORIES[1]: 0, CATEGORIES[2]: 0}  # fmt: skip


def test_pareto_front_keeps_only_undominated_points():
    import pandas as pd

    points = pd.DataFrame({"kl": [0.1, 0.2, 0.3, 0.05, 0.4, 0.2],
                           "refusal": [0.5, 0.6, 0.1, 0.9, 0.0, 0.4]})  # fmt: skip
    front = plots.pareto_front(points, "kl", "refusal")
    assert list(zip(front["kl"], front["refusal"], strict=True)) == [
        (0.05, 0.9), (0.1, 0.5), (0.2, 0.4), (0.3, 0.1), (0.4, 0.0)]  # fmt: skip


@pytest.fixture()
def clean_wandb_env(tmp_path, monkeypatch):
    for variable in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_report_run_holds_the_table_and_figures(category_sweep, clean_wandb_env, capsys):
    args = [str(category_sweep), "--no-trial-figures", "--wandb"]
    assert report.main(args) == 0
    assert "W&B report run: " in capsys.readouterr().out
    (run_dir,) = sorted((category_sweep / "wandb").glob("offline-run-*"))
    summary = inspect_summary(run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["run_id"] == tracking.run_id(category_sweep / "report.md", "report")
    (run,) = [r["run"] for r in inspect_records(run_dir) if r["type"] == "run"]
    assert run["job_type"] == "report"
    assert run["run_group"] == str(category_sweep.resolve())  # the trials' sweep group
    metrics = summary["summary"]
    table = json.loads((run_dir / "files" / metrics[tracking.REPORT_TABLE]["path"]).read_text())
    trials = read_csv(category_sweep / "report.csv")
    assert table["columns"] == list(trials[0]) and len(table["data"]) == len(trials) == 8
    column = table["columns"].index("eval.refusal_rate")
    assert sorted(row[column] for row in table["data"]) == pytest.approx(
        sorted(float(t["eval.refusal_rate"]) for t in trials))  # fmt: skip
    pngs = sorted(p.stem for p in (category_sweep / "report").glob("*.png"))
    assert len(pngs) == len(PLOTS) + len(NEW_PLOTS)
    for stem in pngs:
        image = metrics[f"report/{stem}"]
        assert image["_type"] == "image-file"
        assert (run_dir / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"
    assert metrics["by_layer/refusal_rate_table"]["_type"] == "table-file"
    artifacts = [r["artifact"] for r in inspect_records(run_dir) if r["type"] == "artifact"]
    (bundle,) = [a for a in artifacts if a["type"] == "report"]
    contents = {c["path"] for c in bundle["manifest"]["contents"]}
    assert {"report.md", "report.csv", "report/table1_zero_refusal.csv",
            "report/refusal_vs_kl.png"} <= contents  # fmt: skip
    # a second report run updates the same run: the earlier offline run is set aside
    assert report.main(args) == 0
    (again,) = sorted((category_sweep / "wandb").glob("offline-run-*"))
    assert inspect_summary(again)["run_id"] == summary["run_id"]
    assert not list(clean_wandb_env.rglob("*wandb*"))


def test_cell_table_averages_replicates_as_the_tables_show_them(tmp_path):
    """Three seeds of one cell: counts and rates are the seeds' means, the interval runs from the
    lowest to the highest seed's Wilson bound, and one seed without a count leaves no count."""
    sweep = tmp_path / "sweep"
    for seed, refuse in ((0, 1), (1, 2), (2, 4)):
        results = fake_results_v2("unmatched", 9, 1.0, outcomes(refuse, 0, 10 - refuse, 0),
                                  seed=seed)  # fmt: skip
        results["eval"]["kl_divergence"] = [0.1, 0.2, 0.3][seed]
        write_trial(sweep, f"seed{seed}", results)
    collected, _ = report.collect_results(sweep)
    (cell,) = cells_of(collected).to_dict("records")
    assert cell["n_seeds"] == 3 and not cell["mixed"]
    assert cell["REFUSE"] == pytest.approx(7 / 3) and cell["COMPLY"] == pytest.approx(23 / 3)
    assert cell["refusal_rate"] == pytest.approx(0.7 / 3)
    assert cell["kl_divergence"] == (0.1 + 0.2 + 0.3) / 3  # summed left to right, as before
    assert cell["refusal_rate_ci_low"] == pytest.approx(wilson_interval(1, 10)[0])
    assert cell["refusal_rate_ci_high"] == pytest.approx(wilson_interval(4, 10)[1])
    collected[1]["eval"]["outcomes"]["REFUSE"] = None
    collected[1]["eval"]["refusals"] = None
    collected[1]["eval"]["refusal_rate"] = None
    (cell,) = cells_of(collected).to_dict("records")
    assert math.isnan(cell["REFUSE"]) and math.isnan(cell["refusal_rate"])


def test_the_refuser_recipe_is_a_model_of_its_own_and_v9_replicates_older_trials():
    """model.recipe v9 and a trial from before the field are one build (replicates, not a mixed
    cell); another recipe is another model in the report (``name@v12``), and so is the null
    recipe since the default became v16 (``name@v16``)."""
    import copy

    older = fake_results_v2("matched", 9, 1.0, outcomes(1, 0, 9, 0), seed=0)
    older["config"]["model"] = {"name": "tiny", "source": "embedded"}
    variants = {}
    for seed, recipe in enumerate((None, "v9", "v12", "v16"), start=1):
        trial = copy.deepcopy(older)
        trial["trial"]["seed"] = trial["config"]["seed"] = seed
        trial["config"]["model"]["recipe"] = recipe
        variants[recipe] = trial
    assert report.config_differences([older, variants["v9"]]) == []
    assert report.config_differences([variants[None], variants["v16"]]) == []
    assert report.config_differences([older, variants["v12"]]) == ["config.model.recipe"]
    assert report.config_differences([older, variants[None]]) == ["config.model.recipe"]
    assert [report.model_label(t) for t in (older, variants["v9"])] == ["tiny"] * 2
    assert report.model_label(variants["v12"]) == "tiny@v12"
    assert report.model_label(variants[None]) == report.model_label(variants["v16"]) == "tiny@v16"
    hub = copy.deepcopy(older)
    hub["config"]["model"] = {"name": "tiny", "source": "hub", "recipe": None}
    assert report.model_label(hub) == "tiny" and report.config_differences([older, hub]) == [
        "config.model.source"
    ]
