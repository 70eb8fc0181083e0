"""What a trial leaves behind: results.json (the contract), completions.jsonl, and the summary.

``results.json`` is written last and atomically (a temporary file, fsync, rename), so a reader
sees either no file or a complete one; ``status`` is ``complete`` only in that final write.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from abliterate import provenance
from abliterate.cache import write_text_atomic

SCHEMA_VERSION = 2
RESULTS_FILE = "results.json"
COMPLETIONS_FILE = "completions.jsonl"
DIRECTIONS_FILE = "directions.safetensors"


def _json_safe(value: Any) -> Any:
    """NaN/inf become null (JSON has no NaN); tensors and numpy scalars become plain numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Write through a staging file, fsync, then rename over ``path`` (the caching layer's
    :func:`abliterate.cache.write_text_atomic`).

    On any OSError (a full disk, a quota, a vanished directory) the staging file is removed and
    the error says which file could not be written; whatever ``path`` held before is untouched.
    """
    write_text_atomic(path, write)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    _write_atomic(path, lambda handle: json.dump(_json_safe(payload), handle, indent=2))


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    """Write results.json with ``status: complete`` (call it last)."""
    payload = {"schema_version": SCHEMA_VERSION, "status": "complete", **results}
    path = output_dir / RESULTS_FILE
    write_json_atomic(path, payload)
    return path


def retire_results(output_dir: Path) -> Path:
    """Move a trial's results.json aside (``results.json.superseded``) before it is rerun."""
    path = output_dir / RESULTS_FILE
    superseded = path.with_name(f"{RESULTS_FILE}.superseded")
    os.replace(path, superseded)
    return superseded


def read_complete_results(output_dir: Path) -> dict[str, Any] | None:
    """The results of a complete trial in ``output_dir``, or None."""
    try:
        results = json.loads((output_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "complete" else None


def complete_trials(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every complete trial below ``root`` (or ``root`` itself) as (directory, results), in path
    order; re-judged copies (``<trial>/judgements/<judge>/``) are not trials of their own."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob(RESULTS_FILE)):
        if "judgements" in path.parent.relative_to(root).parts:
            continue
        results = read_complete_results(path.parent)
        if results is not None:
            found.append((path.parent, results))
    return found


def find_reusable_results(
    output_dir: Path, config_hash: str, code_version: str
) -> tuple[dict[str, Any] | None, str | None]:
    """A finished trial's results, if they were made by this config and this code.

    Returns:
        ``(results, None)`` when the complete results.json has the same config hash and code
        version; ``(None, why)`` when a complete one exists but was made otherwise (``why`` says
        what differs, in one line); ``(None, None)`` when there is no complete result.
    """
    results = read_complete_results(output_dir)
    if results is None:
        return None, None
    recorded = results.get("provenance") or {}
    differences = []
    if recorded.get("config_hash") != config_hash:
        differences.append(f"config hash {recorded.get('config_hash')} -> {config_hash}")
    if recorded.get("code_version") != code_version:
        differences.append(f"code version {recorded.get('code_version')} -> {code_version}")
    if differences:
        return None, f"the finished trial was made with another {' and '.join(differences)}"
    return results, None


def write_completions(output_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = output_dir / COMPLETIONS_FILE

    def write(handle: TextIO) -> None:
        for row in rows:
            handle.write(json.dumps(_json_safe(row)) + "\n")

    _write_atomic(path, write)
    return path


def model_label(results: dict[str, Any]) -> str:
    """The trial's model by name; for the embedded model built from another recipe than v9, with
    the recipe (``smollm2-135m-refuser@v12``), so that builds are told apart (the summary, and
    the report's settings)."""
    trial = results["trial"]
    name = str(trial.get("model_name") or trial["model"])
    # a null recipe is the build the trial ran on (the default then), not today's default
    model = provenance.with_recorded_recipe(results).get("model")
    recipe = provenance.hashed_recipe(model) if isinstance(model, dict) else None
    return f"{name}@{recipe}" if recipe else name


def count_from_rate(rate: Any, n: Any) -> int | None:
    """The count behind a rate that was recorded without it: rate x n, when n is known and the
    product is a whole number (else None)."""
    if not _finite(rate) or not _finite(n) or n <= 0:
        return None
    count = rate * n
    return round(count) if abs(count - round(count)) < 1e-6 else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _counted(rate: Any, count: Any, n: Any) -> str:
    """``count/n = rate``; ``n/a (n=0)`` for an empty set (its rate is None)."""
    if not _finite(rate):
        return "n/a" if n is None else f"n/a (n={n})"
    if not _finite(count):
        count = count_from_rate(rate, n)
    return (
        f"{rate:.2f} (n={'?' if n is None else n})"
        if count is None
        else f"{count}/{n} = {rate:.2f}"
    )


def format_summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal: each rate as its count out of n (``15/18 = 0.83``; a rate of
    an empty set, None in results.json, shows n/a)."""
    trial, ev, geometry = results["trial"], results["eval"], results["geometry"]
    unedited = results["baseline_eval"]  # the unedited model's (record name: baseline_eval)

    def before_after(key: str, count: str, unedited_count: Any, n: str) -> str:
        """The unedited model's rate -> the edited model's, each a count out of n."""
        n_edited = ev.get(n)
        n_unedited = n_edited if unedited.get(n) is None else unedited[n]
        return (
            f"{_counted(unedited.get(key), unedited_count, n_unedited)}"
            f" -> {_counted(ev.get(key), ev.get(count), n_edited)}"
        )

    def interval(bounds: Any) -> str:
        return "" if not bounds else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"

    def outcomes(counts: Any) -> str:
        if not counts:  # schema 1: rates only
            n = ev.get("n_harmful")
            return (
                f"comply {_counted(ev.get('comply_rate'), None, n)}, "
                f"evasive {_counted(ev.get('evasive_rate'), None, n)}"
            )
        return "  ".join(f"{name} {count}" for name, count in counts.items())

    unedited_refusals = (unedited.get("outcomes") or {}).get("REFUSE", ev.get("baseline_refusals"))
    lines = [
        f"trial  {model_label(results)}  baseline={trial['baseline']}"
        f"  extraction={trial['extraction']}/{trial['orthogonalize']}  layer={trial['layer']}"
        f"  w={trial['weight']}  scope={trial['scope']}  combine={trial['combine']}",
        f"  directions: {results['directions']['count']} (degenerate {results['directions']['degenerate']})",
        f"  harmful refusal   {before_after('refusal_rate', 'refusals', unedited_refusals, 'n_harmful')}"
        f"{interval(ev.get('refusal_rate_ci95'))}   judge={trial.get('judge', 'markers')}",
        f"  outcomes (n={ev['n_harmful']})  {outcomes(ev.get('outcomes'))}"
        f"   refusals removed {ev.get('refusals_removed', 'n/a')}",
        # the unedited model's false refusals are recorded as rates (their count is rate x n)
        f"  harmless refusal  {before_after('harmless_refusal_rate', 'harmless_refusals', None, 'n_harmless')}"
        f"   matched {before_after('matched_harmless_refusal_rate', 'matched_harmless_refusals', None, 'n_matched')}",
        f"  KL {ev['kl_divergence']:.4f} ({ev.get('n_kl_prompts', '?')} prompts x {ev['kl_tokens']} tok)"
        f"   efficiency {ev['efficiency']:.1f}",
        f"  geometry: |m|/|u| {_fmt(geometry.get('norm_ratio_matched_to_unmatched'))}"
        f"  cos(m,u) {_fmt(geometry.get('cos_matched_unmatched'))}"
        f"  cos(t,u) {_fmt(geometry.get('cos_topic_unmatched'))}"
        f"  capture {_fmt(geometry.get('capture'))}  perturbation {_fmt(geometry.get('perturbation_ratio'))}",
        f"  time {results['timing_s']['total']:.1f} s   activations cache: {results['cache']['activations']}",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else f"{value:.3f}"
    )


def build_results(
    cfg: Any,
    *,
    layer: int,
    num_layers: int,
    combine: str,
    extraction_seed: int,
    judge: str,
    directions: dict[str, Any],
    unedited_eval: dict[str, Any],
    evaluation: dict[str, Any],
    geometry: dict[str, Any],
    cache: dict[str, str],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The results contract's blocks for one trial (docs/results-contract.md), from its config
    and what its stages measured; ``status``, ``schema_version`` and ``timing_s`` are added when
    it is written."""
    from omegaconf import OmegaConf

    ablation = cfg.ablation
    return {
        "trial": {
            "model": cfg.model.path,
            "model_name": cfg.model.name,
            "baseline": cfg.baseline.name,
            "extraction": cfg.extraction.method,
            "orthogonalize": cfg.extraction.orthogonalize,
            "layer": layer,
            "weight": float(ablation.weight),
            "scope": ablation.scope,
            "combine": combine,
            "combine_configured": ablation.combine,
            "direction_norm": ablation.direction_norm,
            "norm_preserving": bool(ablation.norm_preserving),
            "embeddings": bool(ablation.embeddings),
            "mode": ablation.mode,
            "num_layers": num_layers,
            "seed": int(cfg.seed),
            "extraction_seed": extraction_seed,
            "judge": judge,
        },
        "directions": directions,
        "baseline_eval": unedited_eval,  # the unedited model's; the record keeps this name
        "eval": evaluation,
        "geometry": geometry,
        "cache": cache,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance,
    }
