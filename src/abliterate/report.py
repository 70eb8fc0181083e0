"""The sweep report: every trial's results.json under a directory, tabulated and plotted as the study.

    python -m abliterate.report multirun/2026-11-29/12-00-00

A *setting* is everything about a trial except its layer and weight (baseline, extraction,
orthogonalization, scope, ...); the study compares settings over a layer x weight grid.

Writes, beside the trials:
    report.md                       every table below, and the plots
    report.csv                      one row per complete trial (raw numbers, for notebooks)
    report/table1_zero_refusal.csv  per setting, each layer reaching zero refusals: min weight, KL,
                                    efficiency (Petrov's Table 1)
    report/table2_refusals_<setting>.csv   refusals by layer x weight, one grid per setting
    report/table3_geometry_by_layer.csv    |m|/|u|, cos(m,u), cos(t,u), capture per setting
    report/refusal_vs_layer.png, kl_vs_weight.png, norm_ratio_by_layer.png, direction_cosines.png

Incomplete trials (a Hydra job directory without a complete results.json) are listed in the
report and on the terminal, never silently dropped; the exit status is 1 when there are any.
Plots use Matplotlib's Agg canvas directly, so no display and no global backend switch is needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from abliterate.records import RESULTS_FILE

REPORT_FILE = "report.md"
TRIALS_CSV = "report.csv"
REPORT_SUBDIR = "report"

# trial keys that, with the model, define a setting; layer and weight are the grid's axes, and
# seed, mode (weights vs hooks give the same edit) and num_layers describe rather than define it
SETTING_KEYS = (
    "baseline",
    "extraction",
    "orthogonalize",
    "scope",
    "combine",
    "direction_norm",
    "norm_preserving",
    "embeddings",
)

Results = dict[str, Any]
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# --- reading -------------------------------------------------------------------------------


def _natural_key(path: Path) -> list[Any]:
    """Sort ``2_x`` before ``10_x`` (Hydra numbers sweep jobs without padding)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def collect_results(root: Path) -> tuple[list[Results], list[tuple[Path, str]]]:
    """Complete results under ``root`` and the incomplete trials.

    A trial directory is one holding a results.json or Hydra's ``.hydra`` folder (a job that
    started). Each complete result gets ``_dir``, its directory.

    Returns:
        (complete results sorted by model, setting, layer, weight; [(directory, why)] of the
        trials without a complete results.json).
    """
    root = Path(root)
    trial_dirs = {p.parent for p in root.rglob(".hydra")} | {
        p.parent for p in root.rglob(RESULTS_FILE)
    }
    complete: list[Results] = []
    incomplete: list[tuple[Path, str]] = []
    for directory in sorted(trial_dirs, key=_natural_key):
        path = directory / RESULTS_FILE
        if not path.exists():
            incomplete.append((directory, "no results.json (running, failed or killed)"))
            continue
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            incomplete.append((directory, f"unreadable results.json ({type(error).__name__})"))
            continue
        if results.get("status") != "complete":
            incomplete.append((directory, f"status={results.get('status')!r}"))
            continue
        results["_dir"] = str(directory)
        complete.append(results)
    complete.sort(key=lambda r: (*setting_key(r), r["trial"]["layer"], r["trial"]["weight"]))
    return complete, incomplete


# --- settings --------------------------------------------------------------------------------


def _model_name(results: Results) -> str:
    trial = results["trial"]
    return str(trial.get("model_name") or trial["model"])


def setting_key(results: Results) -> tuple[str, ...]:
    """(model, baseline, extraction, orthogonalize, ...): what a layer x weight grid holds fixed."""
    trial = results["trial"]
    return (_model_name(results), *(str(trial.get(key, "")) for key in SETTING_KEYS))


class Settings:
    """The settings of a sweep, with labels that name what distinguishes them."""

    def __init__(self, results: Sequence[Results]):
        self.keys: list[tuple[str, ...]] = sorted({setting_key(r) for r in results})
        names = ("model", *SETTING_KEYS)
        self.varying = {
            name for i, name in enumerate(names) if len({key[i] for key in self.keys}) > 1
        }

    def label(self, key: tuple[str, ...]) -> str:
        """E.g. ``unmatched``, ``matched +SVD``, ``matched scope=layer``."""
        fields = dict(zip(("model", *SETTING_KEYS), key, strict=True))
        parts = [fields["model"]] if "model" in self.varying else []
        parts.append(fields["baseline"])
        if fields["orthogonalize"] == "svd":
            parts.append("+SVD")
        parts += [
            f"{name}={fields[name]}"
            for name in SETTING_KEYS
            if name in self.varying and name not in ("baseline", "orthogonalize")
        ]
        return " ".join(parts)

    def slug(self, key: tuple[str, ...]) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label(key).replace("+SVD", "svd")).strip("_")


def _group(results: Iterable[Results], key: Callable[[Results], Any]) -> dict[Any, list[Results]]:
    groups: dict[Any, list[Results]] = defaultdict(list)
    for r in results:
        groups[key(r)].append(r)
    return groups


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Iterable[Any]) -> float | None:
    finite = [float(v) for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else None


def _get(results: Results, block: str, key: str) -> Any:
    return (results.get(block) or {}).get(key)


def _cell(results: list[Results], block: str, key: str) -> float | None:
    """The mean of a value over the trials in one grid cell (several seeds, or duplicates)."""
    return _mean(_get(r, block, key) for r in results)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if not _finite(value) else format(value, spec)


def _fmt_kl(value: Any) -> str:
    """Four decimals as Petrov reports KL; tiny values (tiny models, small weights) in e-notation."""
    return _fmt(value, ".1e" if _finite(value) and 0 < abs(value) < 5e-4 else ".4f")


def _fmt_count(value: float | None) -> str:
    if value is None:
        return "n/a"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# --- tables ----------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A padded Markdown table."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join(lines)


def zero_refusal_rows(results: list[Results], settings: Settings) -> list[dict[str, Any]]:
    """Table 1: per setting, every layer where some weight leaves zero refusals, with the lowest
    such weight and its KL and efficiency; a setting that never gets there gets one row with its
    best (fewest refusals, then lowest KL) trial instead."""
    rows = []
    for key, trials in _group(results, setting_key).items():
        cells = _group(trials, lambda r: (r["trial"]["layer"], r["trial"]["weight"]))
        by_layer: dict[int, list[float]] = defaultdict(list)
        for (layer, weight), cell in cells.items():
            if _cell(cell, "eval", "refusals") == 0:
                by_layer[layer].append(weight)
        base = {"setting": settings.label(key), "baseline": key[1], "orthogonalize": key[3]}
        for layer in sorted(by_layer):
            weight = min(by_layer[layer])
            cell = cells[(layer, weight)]
            rows.append(
                {
                    **base,
                    "reached": True,
                    "layer": layer,
                    "weight": weight,
                    "refusals": 0,
                    "n_harmful": _cell(cell, "eval", "n_harmful"),
                    "kl_divergence": _cell(cell, "eval", "kl_divergence"),
                    "efficiency": _cell(cell, "eval", "efficiency"),
                    "harmless_refusal_rate": _cell(cell, "eval", "harmless_refusal_rate"),
                }
            )
        if not by_layer:

            def badness(item: tuple[tuple[int, float], list[Results]]) -> tuple[float, float]:
                refusals = _cell(item[1], "eval", "refusals")
                kl = _cell(item[1], "eval", "kl_divergence")
                return (math.inf if refusals is None else refusals, math.inf if kl is None else kl)

            (layer, weight), cell = min(cells.items(), key=badness)
            rows.append(
                {
                    **base,
                    "reached": False,
                    "layer": layer,
                    "weight": weight,
                    "refusals": _cell(cell, "eval", "refusals"),
                    "n_harmful": _cell(cell, "eval", "n_harmful"),
                    "kl_divergence": _cell(cell, "eval", "kl_divergence"),
                    "efficiency": _cell(cell, "eval", "efficiency"),
                    "harmless_refusal_rate": _cell(cell, "eval", "harmless_refusal_rate"),
                }
            )
    return rows


TABLE1_FIELDS = ("setting", "baseline", "orthogonalize", "reached", "layer", "weight", "refusals",
                 "n_harmful", "kl_divergence", "efficiency", "harmless_refusal_rate")  # fmt: skip


def format_zero_refusal_table(rows: list[dict[str, Any]]) -> str:
    header = ["setting", "layer", "min w (R=0)", "KL", "efficiency", "harmless false refusals"]
    lines = []
    for row in rows:
        if row["reached"]:
            lines.append(
                [
                    row["setting"],
                    row["layer"],
                    f"{row['weight']:g}",
                    _fmt_kl(row["kl_divergence"]),
                    _fmt(row["efficiency"], ".1f"),
                    _fmt(row["harmless_refusal_rate"], ".2f"),
                ]
            )
        else:
            lines.append(
                [
                    row["setting"],
                    "none",
                    f"not reached (best R = {_fmt_count(row['refusals'])}/"
                    f"{_fmt_count(row['n_harmful'])} at layer {row['layer']}, w={row['weight']:g})",
                    _fmt_kl(row["kl_divergence"]),
                    _fmt(row["efficiency"], ".1f"),
                    _fmt(row["harmless_refusal_rate"], ".2f"),
                ]
            )
    return markdown_table(header, lines)


def refusal_grid(trials: list[Results]) -> tuple[list[int], list[float], dict[tuple, Any]]:
    """Table 2 for one setting: (layers, weights, {(layer, weight): mean refusals})."""
    cells = _group(trials, lambda r: (r["trial"]["layer"], r["trial"]["weight"]))
    layers = sorted({layer for layer, _ in cells})
    weights = sorted({weight for _, weight in cells})
    return layers, weights, {k: _cell(v, "eval", "refusals") for k, v in cells.items()}


def format_refusal_grid(trials: list[Results]) -> str:
    layers, weights, grid = refusal_grid(trials)
    header = ["layer", *(f"w={w:g}" for w in weights)]
    rows = [
        [layer, *(_fmt_count(grid[(layer, w)]) if (layer, w) in grid else "" for w in weights)]
        for layer in layers
    ]
    return markdown_table(header, rows)


def geometry_rows(results: list[Results], settings: Settings) -> list[dict[str, Any]]:
    """Table 3: per model and layer, the contrast geometry (which depends only on the prompts) and
    each setting's capture (which does not depend on the weight), means over trials."""
    rows = []
    for (model, layer), trials in sorted(
        _group(results, lambda r: (_model_name(r), r["trial"]["layer"])).items()
    ):
        row: dict[str, Any] = {
            "model": model,
            "layer": layer,
            "norm_ratio_matched_to_unmatched": _cell(
                trials, "geometry", "norm_ratio_matched_to_unmatched"
            ),
            "cos_matched_unmatched": _cell(trials, "geometry", "cos_matched_unmatched"),
            "cos_topic_unmatched": _cell(trials, "geometry", "cos_topic_unmatched"),
        }
        by_setting = _group(trials, setting_key)
        for key in settings.keys:
            if key[0] == model:
                row[f"capture {settings.label(key)}"] = _cell(
                    by_setting.get(key, []), "geometry", "capture"
                )
        rows.append(row)
    return rows


def format_geometry_table(rows: list[dict[str, Any]], several_models: bool) -> str:
    if not rows:
        return "(no trials)"
    names = [k for k in rows[0] if k != "model" or several_models]
    titles = {
        "norm_ratio_matched_to_unmatched": "norm m/u",
        "cos_matched_unmatched": "cos(m,u)",
        "cos_topic_unmatched": "cos(t,u)",
    }
    header = [titles.get(n, n) for n in names]
    body = [
        [row.get(n) if n in ("model", "layer") else _fmt(row.get(n)) for n in names] for row in rows
    ]
    return markdown_table(header, body)


TRIAL_COLUMNS: tuple[tuple[str, Callable[[Results], Any]], ...] = (
    ("setting", lambda r: r["_setting"]),
    ("layer", lambda r: r["trial"]["layer"]),
    ("weight", lambda r: r["trial"]["weight"]),
    ("dirs", lambda r: r["directions"]["count"]),
    ("refusals", lambda r: f"{_fmt_count(_get(r, 'eval', 'refusals'))}/{r['eval']['n_harmful']}"),
    (
        "refusal",
        lambda r: (
            f"{_fmt(r['baseline_eval']['refusal_rate'], '.2f')}->"
            f"{_fmt(r['eval']['refusal_rate'], '.2f')}"
        ),
    ),
    ("comply", lambda r: _fmt(r["eval"]["comply_rate"], ".2f")),
    ("harmless_fr", lambda r: _fmt(r["eval"]["harmless_refusal_rate"], ".2f")),
    ("matched_fr", lambda r: _fmt(r["eval"]["matched_harmless_refusal_rate"], ".2f")),
    ("kl", lambda r: _fmt_kl(r["eval"]["kl_divergence"])),
    ("efficiency", lambda r: _fmt(r["eval"]["efficiency"], ".1f")),
    ("norm m/u", lambda r: _fmt(r["geometry"].get("norm_ratio_matched_to_unmatched"))),
    ("capture", lambda r: _fmt(r["geometry"].get("capture"))),
)

# report.csv: raw values, one row per trial
CSV_FIELDS: tuple[tuple[str, str], ...] = (
    *(("trial", k) for k in ("model", "baseline", "extraction", "orthogonalize", "layer")),
    *(("trial", k) for k in ("weight", "scope", "combine", "direction_norm", "seed")),
    ("directions", "count"),
    *(("baseline_eval", k) for k in ("refusal_rate", "harmless_refusal_rate")),
    *(("eval", k) for k in ("n_harmful", "refusals", "refusal_rate", "evasive_rate")),
    *(("eval", k) for k in ("comply_rate", "harmless_refusal_rate")),
    *(("eval", k) for k in ("matched_harmless_refusal_rate", "kl_divergence", "efficiency")),
    *(("geometry", k) for k in ("norm_ratio_matched_to_unmatched", "cos_matched_unmatched")),
    *(("geometry", k) for k in ("cos_topic_unmatched", "capture", "perturbation_ratio")),
    ("timing_s", "total"),
)


def format_table(results: list[Results]) -> str:
    """A Markdown table of the trials, one row each."""
    settings = Settings(results)
    for r in results:
        r["_setting"] = settings.label(setting_key(r))
    header = [name for name, _ in TRIAL_COLUMNS]
    return markdown_table(header, [[get(r) for _, get in TRIAL_COLUMNS] for r in results])


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


# --- plots -----------------------------------------------------------------------------------


def new_figure(panels: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    """A figure on an Agg canvas with ``panels`` axes in a grid of up to three columns."""
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(rows, cols, i + 1) for i in range(panels)]
    return figure, axes


def save_figure(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def draw_cosine_heatmap(ax, matrix: Sequence[Sequence[float]], labels: Sequence[str]) -> Any:
    """The pairwise cosines of the directions, -1 (blue) to 1 (red), values written in when few."""
    k = len(matrix)
    values = [[v if _finite(v) else math.nan for v in row] for row in matrix]
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    names = [str(label).replace("_", " ") for label in labels] if len(labels) == k else []
    ax.set_xticks(range(k), names or range(k), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), names or range(k), fontsize=7)
    if k <= 12:
        for i in range(k):
            for j in range(k):
                if _finite(values[i][j]):
                    color = "white" if abs(values[i][j]) > 0.6 else "black"
                    ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=6,
                            color=color)  # fmt: skip
    return image


def _by_weight_colors(values: Sequence[float], cmap: str = "viridis") -> dict[float, Any]:
    from matplotlib import colormaps

    colors = colormaps[cmap]
    span = max(len(values) - 1, 1)
    return {v: colors(0.1 + 0.8 * i / span) for i, v in enumerate(values)}


def plot_refusal_vs_layer(results: list[Results], settings: Settings, path: Path) -> Path:
    """One panel per setting: refusal rate against layer, a line per weight; dashed: unedited."""
    figure, axes = new_figure(len(settings.keys))
    groups = _group(results, setting_key)
    weights_all = sorted({r["trial"]["weight"] for r in results})
    colors = _by_weight_colors(weights_all)
    for ax, key in zip(axes, settings.keys, strict=True):
        trials = groups[key]
        for weight, cell in sorted(_group(trials, lambda r: r["trial"]["weight"]).items()):
            points = sorted(
                (layer, _cell(c, "eval", "refusal_rate"))
                for layer, c in _group(cell, lambda r: r["trial"]["layer"]).items()
            )
            rank = weights_all.index(weight)
            ax.plot(
                [p[0] for p in points],
                [math.nan if p[1] is None else p[1] for p in points],
                marker=MARKERS[rank % len(MARKERS)],
                markersize=3 + 3 * (len(weights_all) - 1 - rank) / max(len(weights_all) - 1, 1),
                linewidth=1 + 2 * (len(weights_all) - 1 - rank) / max(len(weights_all) - 1, 1),
                color=colors[weight],
                label=f"w={weight:g}",
            )  # lower weights drawn wider, so lines that coincide stay visible
        unedited = _cell(trials, "baseline_eval", "refusal_rate")
        if unedited is not None:
            ax.axhline(unedited, color="grey", linestyle="--", linewidth=1, label="unedited")
        ax.set_title(settings.label(key), fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("harmful refusal rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(figure, path)


def plot_kl_vs_weight(results: list[Results], settings: Settings, path: Path) -> Path:
    """One panel per setting: KL(original || ablated) against weight, a line per layer."""
    figure, axes = new_figure(len(settings.keys))
    groups = _group(results, setting_key)
    layers_all = sorted({r["trial"]["layer"] for r in results})
    colors = _by_weight_colors(layers_all, "plasma")
    positive = all(
        (_get(r, "eval", "kl_divergence") or 0) > 0
        for r in results
        if _finite(_get(r, "eval", "kl_divergence"))
    )
    for ax, key in zip(axes, settings.keys, strict=True):
        for layer, cell in sorted(_group(groups[key], lambda r: r["trial"]["layer"]).items()):
            points = sorted(
                (weight, _cell(c, "eval", "kl_divergence"))
                for weight, c in _group(cell, lambda r: r["trial"]["weight"]).items()
            )
            ax.plot(
                [p[0] for p in points],
                [math.nan if p[1] is None else p[1] for p in points],
                marker="o",
                markersize=3,
                color=colors[layer],
                label=f"L{layer}",
            )
        if positive:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(settings.label(key), fontsize=10)
        ax.set_xlabel("ablation weight w")
        ax.set_ylabel("KL(original || ablated)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers_all) > 8 else 1)
    return save_figure(figure, path)


def plot_norm_ratio_by_layer(rows: list[dict[str, Any]], path: Path) -> Path:
    """|m_c|/|u_c| by layer (Petrov: ~0.1), and how much of u_c is topic (cos(t,u)) or not."""
    figure, (ratio_ax, cos_ax) = new_figure(2)
    for model, model_rows in _group(rows, lambda r: r["model"]).items():
        layers = [r["layer"] for r in model_rows]

        def series(name: str, rows_: list[dict[str, Any]] = model_rows) -> list[float]:
            return [math.nan if r[name] is None else r[name] for r in rows_]

        ratio_ax.plot(layers, series("norm_ratio_matched_to_unmatched"), marker="o", label=model)
        cos_ax.plot(layers, series("cos_matched_unmatched"), marker="o", label=f"cos(m,u) {model}")
        cos_ax.plot(
            layers, series("cos_topic_unmatched"), marker="s", ls="--", label=f"cos(t,u) {model}"
        )
    ratio_ax.set_title("matched / unmatched contrast norm", fontsize=10)
    ratio_ax.set_ylabel("mean over categories of |m_c| / |u_c|")
    cos_ax.set_title("direction of the unmatched contrast u_c = m_c + t_c", fontsize=10)
    cos_ax.set_ylabel("mean cosine over categories")
    for ax in (ratio_ax, cos_ax):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(figure, path)


def representative_trial(trials: list[Results]) -> Results:
    """The trial whose directions a setting is shown by: fewest refusals, then lowest weight, then
    lowest KL (the directions depend on the layer, not the weight)."""

    def rank(r: Results) -> tuple[float, float, float]:
        refusals, kl = _get(r, "eval", "refusals"), _get(r, "eval", "kl_divergence")
        return (
            refusals if _finite(refusals) else math.inf,
            r["trial"]["weight"],
            kl if _finite(kl) else math.inf,
        )

    return min(trials, key=rank)


def plot_direction_cosines(results: list[Results], settings: Settings, path: Path) -> Path:
    """Per setting, the directions' pairwise cosines at its representative layer."""
    figure, axes = new_figure(len(settings.keys), width=4.8, height=4.4)
    groups = _group(results, setting_key)
    image = None
    for ax, key in zip(axes, settings.keys, strict=True):
        trial = representative_trial(groups[key])
        matrix = trial["geometry"].get("direction_cosines") or []
        labels = trial["directions"].get("labels") or []
        ax.set_title(f"{settings.label(key)}, layer {trial['trial']['layer']}", fontsize=10)
        if matrix:
            image = draw_cosine_heatmap(ax, matrix, labels)
        else:
            ax.text(0.5, 0.5, "no directions", ha="center", va="center", transform=ax.transAxes)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    return save_figure(figure, path)


# --- the report ------------------------------------------------------------------------------


def write_report(root: Path, out_dir: Path | None = None) -> tuple[str, list[Path], list]:
    """Write the tables and plots for the trials under ``root``.

    Args:
        root: a sweep (multirun) directory, a run directory, or any tree of trial directories.
        out_dir: where report.md and report.csv go (default ``root``); CSV tables and plots go
            into its ``report/`` folder.

    Returns:
        (the Markdown text, the files written, [(directory, why)] of the incomplete trials).
    """
    root = Path(root)
    out_dir = Path(out_dir or root)
    assets = out_dir / REPORT_SUBDIR
    assets.mkdir(parents=True, exist_ok=True)
    results, incomplete = collect_results(root)
    settings = Settings(results)
    written: list[Path] = []
    text = [f"# Sweep report: {root}", ""]
    text.append(
        f"{len(results)} complete trials, {len(incomplete)} incomplete, "
        f"{len(settings.keys)} settings."
    )

    if results:
        groups = _group(results, setting_key)
        n_harmful = sorted({r["eval"]["n_harmful"] for r in results})
        table1 = zero_refusal_rows(results, settings)
        text += [
            "",
            "## Table 1: layers reaching zero refusals (R = 0), with the lowest such weight",
            "",
            f"R counts refusals among {'/'.join(map(str, n_harmful))} held-out harmful prompts; "
            "efficiency = refusals removed per nat of KL.",
            "",
            format_zero_refusal_table(table1),
        ]
        written.append(
            _write_csv(
                assets / "table1_zero_refusal.csv",
                TABLE1_FIELDS,
                ([row[f] for f in TABLE1_FIELDS] for row in table1),
            )
        )

        text += ["", "## Table 2: refusals R by layer x weight", ""]
        for index, key in enumerate(settings.keys):
            trials = groups[key]
            unedited = _cell(trials, "eval", "baseline_refusals")
            text += [
                f"### Table 2{chr(ord('a') + index % 26)}: {settings.label(key)}"
                f" (unedited R = {_fmt_count(unedited)})",
                "",
                format_refusal_grid(trials),
                "",
            ]
            layers, weights, grid = refusal_grid(trials)
            written.append(
                _write_csv(
                    assets / f"table2_refusals_{settings.slug(key)}.csv",
                    ["layer", *(f"w={w:g}" for w in weights)],
                    ([layer, *(grid.get((layer, w)) for w in weights)] for layer in layers),
                )
            )

        table3 = geometry_rows(results, settings)
        several_models = len({r["model"] for r in table3}) > 1
        text += [
            "## Table 3: contrast geometry and capture by layer",
            "",
            "norm m/u: mean over categories of `|m_c| / |u_c|` (m_c = harmful - matched mean, "
            "u_c = harmful - generic mean; Petrov: ~0.1); cos(t,u): how much of u_c is topic "
            "(t_c = matched - generic mean); capture: the fraction of refused/answered pair "
            "differences in the span of the setting's directions (mean over weights).",
            "",
            format_geometry_table(table3, several_models),
        ]
        table3_fields = list(table3[0])
        written.append(
            _write_csv(
                assets / "table3_geometry_by_layer.csv",
                table3_fields,
                ([row.get(f) for f in table3_fields] for row in table3),
            )
        )

        plots = [
            ("Refusal rate vs layer", plot_refusal_vs_layer(results, settings, assets / "refusal_vs_layer.png")),
            ("KL vs weight", plot_kl_vs_weight(results, settings, assets / "kl_vs_weight.png")),
            ("Matched/unmatched norm ratio by layer", plot_norm_ratio_by_layer(table3, assets / "norm_ratio_by_layer.png")),
            ("Direction cosines", plot_direction_cosines(results, settings, assets / "direction_cosines.png")),
        ]  # fmt: skip
        written += [p for _, p in plots]
        text += ["", "## Plots", ""]
        text += [f"![{title}]({path.relative_to(out_dir).as_posix()})" for title, path in plots]

        text += ["", "## All trials", "", format_table(results)]
    else:
        text += ["", "No complete trials."]

    if incomplete:
        text += ["", f"## Incomplete trials ({len(incomplete)}): no complete results.json", ""]
        text += [f"- {directory}: {why}" for directory, why in incomplete]

    trials_csv = _write_csv(
        out_dir / TRIALS_CSV,
        ["setting", *(f"{block}.{key}" for block, key in CSV_FIELDS), "dir"],
        (
            [settings.label(setting_key(r)), *(_get(r, b, k) for b, k in CSV_FIELDS), r["_dir"]]
            for r in results
        ),
    )
    markdown = "\n".join(text) + "\n"
    report = out_dir / REPORT_FILE
    report.write_text(markdown)
    return markdown, [report, trials_csv, *written], incomplete


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abliterate.report",
        description="Tables and plots of a sweep's trials (every complete results.json below DIR).",
    )
    parser.add_argument("directory", type=Path, help="a sweep (multirun) or run directory")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the report (default: DIRECTORY)"
    )
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    markdown, written, incomplete = write_report(args.directory, args.out)
    print(markdown)
    print("wrote:")
    for path in written:
        print(f"  {path}")
    if incomplete:
        print(f"{len(incomplete)} incomplete trial(s) listed at the end of {written[0]}")
    return 1 if incomplete or not any(p.suffix == ".png" for p in written) else 0


if __name__ == "__main__":
    raise SystemExit(main())
