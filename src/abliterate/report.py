"""The sweep report: read every trial's results.json under a directory and tabulate the study.

    python -m abliterate.report multirun/2026-11-29/12-00-00

Prints a matched-vs-unmatched table (refusal, false refusals, KL, efficiency, geometry per trial),
writes ``report.md`` and ``report.csv`` beside the trials, and lists incomplete trials instead of
dropping them silently.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from abliterate.records import RESULTS_FILE

COLUMNS = (
    ("baseline", lambda r: r["trial"]["baseline"]),
    ("extraction", lambda r: r["trial"]["extraction"] + ("+svd" if r["trial"]["orthogonalize"] == "svd" else "")),
    ("layer", lambda r: r["trial"]["layer"]),
    ("weight", lambda r: r["trial"]["weight"]),
    ("dirs", lambda r: r["directions"]["count"]),
    ("refusal", lambda r: f"{r['baseline_eval']['refusal_rate']:.2f}->{r['eval']['refusal_rate']:.2f}"),
    ("comply", lambda r: f"{r['eval']['comply_rate']:.2f}"),
    ("harmless_fr", lambda r: f"{r['eval']['harmless_refusal_rate']:.2f}"),
    ("matched_fr", lambda r: f"{r['eval']['matched_harmless_refusal_rate']:.2f}"),
    ("kl", lambda r: f"{r['eval']['kl_divergence']:.4f}"),
    ("efficiency", lambda r: f"{r['eval']['efficiency']:.1f}"),
    ("|m|/|u|", lambda r: _num(r["geometry"].get("norm_ratio_matched_to_unmatched"))),
    ("capture", lambda r: _num(r["geometry"].get("capture"))),
)


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def collect_results(root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Complete results under ``root`` (sorted by baseline, layer, weight) and incomplete trial dirs."""
    complete, incomplete = [], []
    trial_dirs = {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob(RESULTS_FILE)}
    for directory in sorted(trial_dirs):
        try:
            results = json.loads((directory / RESULTS_FILE).read_text())
        except (OSError, ValueError):
            incomplete.append(directory)
            continue
        if results.get("status") != "complete":
            incomplete.append(directory)
            continue
        results["_dir"] = str(directory)
        complete.append(results)
    complete.sort(key=lambda r: (r["trial"]["baseline"], r["trial"]["extraction"], r["trial"]["layer"], r["trial"]["weight"]))
    return complete, incomplete


def format_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the trials."""
    header = [name for name, _ in COLUMNS]
    rows = [[str(get(r)) for _, get in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)


def write_report(root: Path) -> tuple[str, list[Path]]:
    results, incomplete = collect_results(root)
    table = format_table(results)
    text = f"# Sweep report: {root}\n\n{len(results)} complete trials\n\n{table}\n"
    if incomplete:
        text += "\nIncomplete trials (no complete results.json):\n" + "".join(f"- {p}\n" for p in incomplete)
    (root / "report.md").write_text(text)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([name for name, _ in COLUMNS] + ["dir"])
    for r in results:
        writer.writerow([get(r) for _, get in COLUMNS] + [r["_dir"]])
    (root / "report.csv").write_text(buffer.getvalue())
    return text, incomplete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abliterate.report", description="Tabulate a sweep's trials.")
    parser.add_argument("directory", type=Path, help="a sweep (multirun) or run directory")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    text, incomplete = write_report(args.directory)
    print(text)
    print(f"wrote {args.directory / 'report.md'} and {args.directory / 'report.csv'}")
    return 1 if incomplete else 0


if __name__ == "__main__":
    raise SystemExit(main())
