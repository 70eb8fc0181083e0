"""Re-judging finished trials from their completions, without generating again.

``python -m abliterate.judge relabel DIR [judge=NAME ...]`` labels every response (edited and
unedited) in each complete trial under DIR with another judge and writes, beside the trial's own
files, ``judgements/<judge>/results.json`` and ``judgements/<judge>/completions.jsonl``: the
trial's results with the outcome blocks (``eval`` and ``baseline_eval``) recomputed and
``trial.judge`` set to the new judge. The trial's own results.json is never touched, so its
original numbers stay; ``python -m abliterate.report DIR --judge NAME`` draws the report from the
re-judged files. KL, the directions and the geometry do not depend on the judge and are kept.

One caveat is recorded in each re-judged file: a trial run with ``eval.early_stop`` stopped a
row as soon as *its* judge called the label decided, so a response may be shorter than
``eval.max_new_tokens``; another judge reads that same shorter text.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from abliterate import records
from abliterate.evaluation import EVAL_SETS, SetResult, summarize_outcomes, summarize_unedited
from abliterate.judge import Judge

JUDGEMENTS_DIR = "judgements"


def find_trials(root: Path) -> list[Path]:
    """Every directory at or under ``root`` holding a complete results.json (not re-judged
    copies)."""
    candidates = [root, *(p.parent for p in sorted(root.rglob(records.RESULTS_FILE)))]
    trials = []
    for directory in dict.fromkeys(candidates):
        if JUDGEMENTS_DIR in directory.relative_to(root).parts:
            continue
        if records.read_complete_results(directory) is not None:
            trials.append(directory)
    return trials


def _read_completions(directory: Path) -> list[dict[str, Any]]:
    path = directory / records.COMPLETIONS_FILE
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _sets(rows: list[dict[str, Any]], labels: list[str], key: str) -> dict[str, SetResult]:
    """SetResults per evaluation set from completion rows (in ``index`` order when recorded)."""
    sets = {}
    for name in EVAL_SETS:
        chosen = sorted(
            (i for i, row in enumerate(rows) if row["set"] == name),
            key=lambda i: rows[i].get("index", i),
        )
        sets[name] = SetResult(
            [rows[i]["prompt"] for i in chosen],
            [rows[i]["category"] for i in chosen],
            [rows[i][key] for i in chosen],
            [labels[i] for i in chosen],
        )
    return sets


def relabel_trial(directory: Path, judge: Judge, judge_config: dict[str, Any]) -> Path:
    """Re-judge one trial; returns the written results.json."""
    results = records.read_complete_results(directory)
    if results is None:
        raise ValueError(f"{directory}: no complete results.json")
    rows = _read_completions(directory)
    prompts = [row["prompt"] for row in rows]
    edited = judge.label(prompts, [row["response"] for row in rows])
    # completions.jsonl names the unedited model's response and label baseline_response/_label
    unedited_labels = judge.label(prompts, [row["baseline_response"] for row in rows])
    sets = _sets(rows, edited, "response")
    unedited_sets = _sets(rows, unedited_labels, "baseline_response")
    config_eval = (results.get("config") or {}).get("eval") or {}
    old_eval = results["eval"]
    relabelled = copy.deepcopy(results)
    relabelled.pop("status", None)
    relabelled.pop("schema_version", None)
    relabelled["eval"] = summarize_outcomes(
        sets,
        unedited_sets,
        old_eval["kl_divergence"],
        old_eval.get("n_kl_prompts") or config_eval.get("kl_prompts") or 0,
        {
            "kl_tokens": old_eval.get("kl_tokens"),
            "kl_top_k": old_eval.get("kl_top_k"),
            "kl_floor": config_eval.get("kl_floor", 1e-3),
        },
    )
    relabelled["baseline_eval"] = summarize_unedited(unedited_sets)
    relabelled["trial"]["judge"] = judge.name
    relabelled["relabel"] = {
        "judge_config": judge_config,
        "original_judge": results["trial"].get("judge", "markers (schema 1)"),
        "early_stop_of_the_original_run": config_eval.get("early_stop"),
        "judge_stats": judge.stats,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = directory / JUDGEMENTS_DIR / judge.name
    out.mkdir(parents=True, exist_ok=True)
    completions = [
        {**row, "label": edited[i], "baseline_label": unedited_labels[i]}
        for i, row in enumerate(rows)
    ]
    records.write_completions(out, completions)
    return records.write_results(out, relabelled)


def relabel(root: Path, judge: Judge, judge_config: dict[str, Any]) -> list[Path]:
    """Re-judge every complete trial at or under ``root``."""
    trials = find_trials(root)
    if not trials:
        raise ValueError(f"{root}: no complete trial (results.json) found")
    return [relabel_trial(directory, judge, judge_config) for directory in trials]
