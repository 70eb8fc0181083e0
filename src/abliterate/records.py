"""What a trial leaves behind: results.json (the contract), completions.jsonl, and the summary.

``results.json`` is written last and atomically (a temporary file, fsync, rename), so a reader
sees either no file or a complete one; ``status`` is ``complete`` only in that final write.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

SCHEMA_VERSION = 1
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
    """Write through a temporary file, fsync, then rename over ``path``.

    On any OSError (a full disk, a quota, a vanished directory) the temporary file is removed and
    the error says which file could not be written; whatever ``path`` held before is untouched.
    """
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise OSError(
            error.errno,
            f"could not write {path}: {error.strerror or error}; its previous content (if any) "
            "is unchanged",
        ) from error


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


def write_completions(output_dir: Path, rows: list[dict[str, Any]]) -> Path:
    path = output_dir / COMPLETIONS_FILE

    def write(handle: TextIO) -> None:
        for row in rows:
            handle.write(json.dumps(_json_safe(row)) + "\n")

    _write_atomic(path, write)
    return path


def format_summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    trial, ev, geometry = results["trial"], results["eval"], results["geometry"]
    base = results["baseline_eval"]
    lines = [
        f"trial  {trial['model']}  baseline={trial['baseline']}  extraction={trial['extraction']}"
        f"/{trial['orthogonalize']}  layer={trial['layer']}  w={trial['weight']}  scope={trial['scope']}"
        f"  combine={trial['combine']}",
        f"  directions: {results['directions']['count']} (degenerate {results['directions']['degenerate']})",
        f"  harmful refusal   {base['refusal_rate']:.2f} -> {ev['refusal_rate']:.2f}"
        f"   (comply {ev['comply_rate']:.2f}, evasive {ev['evasive_rate']:.2f}, n={ev['n_harmful']})",
        f"  harmless refusal  {base['harmless_refusal_rate']:.2f} -> {ev['harmless_refusal_rate']:.2f}"
        f"   matched {base['matched_harmless_refusal_rate']:.2f} -> {ev['matched_harmless_refusal_rate']:.2f}",
        f"  KL {ev['kl_divergence']:.4f} ({ev['kl_tokens']} tok)   efficiency {ev['efficiency']:.1f}",
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
