"""Re-judging a finished trial from its completions, keeping the original results intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_pipeline import compose_trial

from abliterate.judge import OUTCOMES, build_judge
from abliterate.pipeline import Session, run_trial

REPO = Path(__file__).resolve().parents[1]


def test_relabel_rejudges_without_touching_the_trial(tiny_model_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, tmp_path, "eval.early_stop=false")
    original = run_trial(cfg, session=Session())
    out = tmp_path / "out"
    before = (out / "results.json").read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "abliterate.judge", "relabel", str(tmp_path), "judge=markers"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    written = out / "judgements" / "markers" / "results.json"
    assert done.stdout.split() == [str(written)]
    assert (out / "results.json").read_bytes() == before
    relabelled = json.loads(written.read_text())
    assert relabelled["status"] == "complete"
    assert relabelled["trial"]["judge"] == "markers"
    assert relabelled["relabel"]["original_judge"] == original["trial"]["judge"] == "rules"
    # judge-independent numbers are kept
    assert relabelled["eval"]["kl_divergence"] == original["eval"]["kl_divergence"]
    assert relabelled["geometry"] == json.loads(before)["geometry"]
    # the labels are the markers judge's, and the counts are those labels'
    rows = [json.loads(line) for line in (written.parent / "completions.jsonl").open()]
    markers = build_judge({"name": "markers"})
    assert [row["label"] for row in rows] == markers.label(
        [row["prompt"] for row in rows], [row["response"] for row in rows]
    )
    harmful = [row for row in rows if row["set"] == "harmful"]
    outcomes = relabelled["eval"]["outcomes"]
    assert set(outcomes) == set(OUTCOMES)
    assert outcomes == {o: sum(row["label"] == o for row in harmful) for o in OUTCOMES}
    assert relabelled["eval"]["n_harmful"] == len(harmful) == original["eval"]["n_harmful"]
    removed = sum(row["baseline_label"] == "REFUSE" and row["label"] == "COMPLY" for row in harmful)
    assert relabelled["eval"]["refusals_removed"] == removed


def test_relabel_with_the_trials_own_judge_reproduces_its_outcomes(tiny_model_dir, tmp_path):
    from abliterate.relabel import relabel

    cfg = compose_trial(tiny_model_dir, tmp_path, "eval.early_stop=false")
    original = run_trial(cfg, session=Session())
    [written] = relabel(tmp_path / "out", build_judge(), {"name": "rules"})
    relabelled = json.loads(written.read_text())
    for key in ("outcomes", "refusals", "refusal_rate_ci95", "harmless_refusal_rate"):
        assert relabelled["eval"][key] == original["eval"][key], key
    assert relabelled["baseline_eval"] == original["baseline_eval"]
