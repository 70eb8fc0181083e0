"""Figures: a trial's own (written into ``<trial>/plots/``) and the sweep report's study views.

    write_trial_figures(results, trial_dir)      # direction cosines, geometry, outcomes by category
    plot_refusal_vs_kl(cells, path)              # Pareto front of refusal against KL per setting

Study figures take pandas frames that ``abliterate.report`` builds (one row per cell, replicates
averaged, mixed cells left out), so this module knows nothing about settings or cells; W&B
(``abliterate.tracking``) only logs the PNGs written here. Everything draws on Matplotlib's Agg
canvas directly: no display and no global backend switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PLOTS_DIR = "plots"  # a trial's figures: <trial>/plots/
OUTCOMES = ("REFUSE", "EVASIVE", "COMPLY", "INCOHERENT")
OUTCOME_RATES = {"REFUSE": "refusal_rate", "EVASIVE": "evasive_rate", "COMPLY": "comply_rate",
                 "INCOHERENT": "incoherent_rate"}  # fmt: skip
OUTCOME_COLORS = {"REFUSE": "#c0392b", "EVASIVE": "#f39c12", "COMPLY": "#27ae60",
                  "INCOHERENT": "#7f8c8d"}  # fmt: skip
# a trial's figures: W&B key -> file name under <trial>/plots/
TRIAL_FIGURES = {
    "figures/direction_cosines": "direction_cosines.png",
    "figures/geometry": "geometry.png",
    "figures/outcomes_by_category": "outcomes_by_category.png",
}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nan(value: Any) -> float:
    return float(value) if _finite(value) else math.nan


def new_figure(panels: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    """A figure on an Agg canvas with ``panels`` axes in a grid of up to three columns."""
    cols = min(max(panels, 1), 3)
    rows = math.ceil(max(panels, 1) / cols)
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
    values = [[_nan(v) for v in row] for row in matrix]
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


# --- a trial's figures ---------------------------------------------------------------------------


def _trial_title(results: dict[str, Any]) -> str:
    trial = results["trial"]
    svd = " +SVD" if trial.get("orthogonalize") == "svd" else ""
    return (
        f"{trial.get('model_name') or trial.get('model')}: {trial['baseline']}{svd} "
        f"{trial['extraction']}, combine={trial.get('combine', 'n/a')}, layer {trial['layer']}, "
        f"w={trial['weight']:g}"
    )


def plot_trial_cosines(results: dict[str, Any], path: Path) -> Path | None:
    """The trial's directions' pairwise cosines (None: no directions)."""
    matrix = (results.get("geometry") or {}).get("direction_cosines") or []
    if not matrix:
        return None
    figure, (ax,) = new_figure(1, width=6.0, height=5.4)
    image = draw_cosine_heatmap(ax, matrix, (results.get("directions") or {}).get("labels") or [])
    figure.colorbar(image, ax=ax, shrink=0.8, label="cosine")
    ax.set_title(f"direction cosines\n{_trial_title(results)}", fontsize=9)
    return save_figure(figure, path)


def plot_trial_geometry(results: dict[str, Any], path: Path) -> Path | None:
    """Per category: |m_c|/|u_c|, cos(m_c, u_c) and cos(t_c, u_c); per direction its cosine to the
    diff-in-means direction (None: none of it recorded)."""
    geometry = results.get("geometry") or {}
    per_category = geometry.get("per_category") or {}
    to_mean = geometry.get("cosine_to_diff_in_means") or []
    if not per_category and not to_mean:
        return None
    figure, (ratio_ax, cos_ax, mean_ax) = new_figure(3, width=4.6, height=4.0)
    names = sorted(per_category)
    short = [n.replace("_", " ") for n in names]

    def series(key: str) -> list[float]:
        return [_nan(per_category[n].get(key)) for n in names]

    ratio_ax.bar(short, series("norm_ratio_matched_to_unmatched"), color="tab:blue")
    ratio_ax.set_title("|m_c| / |u_c| per category", fontsize=10)
    positions = range(len(names))
    cos_ax.bar([p - 0.2 for p in positions], series("cos_matched_unmatched"), 0.4,
               label="cos(m_c, u_c)")  # fmt: skip
    cos_ax.bar([p + 0.2 for p in positions], series("cos_topic_unmatched"), 0.4,
               label="cos(t_c, u_c)")  # fmt: skip
    cos_ax.set_xticks(list(positions), short)
    cos_ax.set_title("cosines per category", fontsize=10)
    cos_ax.legend(fontsize=7)
    labels = (results.get("directions") or {}).get("labels") or [
        str(i) for i in range(len(to_mean))
    ]
    mean_ax.bar(
        [str(n).replace("_", " ") for n in labels][: len(to_mean)], [_nan(v) for v in to_mean],
        color="tab:green",
    )  # fmt: skip
    mean_ax.set_title("cos(direction, diff-in-means)", fontsize=10)
    for ax in (ratio_ax, cos_ax, mean_ax):
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    figure.suptitle(_trial_title(results), fontsize=10)
    return save_figure(figure, path)


def plot_trial_outcomes(results: dict[str, Any], path: Path) -> Path | None:
    """The four outcomes per harm category as stacked counts of the edited model
    (None: no per-category outcomes)."""
    by_category = (results.get("eval") or {}).get("outcomes_by_category") or {}
    if not by_category:
        return None
    names = sorted(by_category)
    figure, (ax,) = new_figure(1, width=max(6.0, 0.75 * len(names) + 2.5), height=4.2)
    bottom = [0.0] * len(names)
    for outcome in OUTCOMES:
        counts = [float(by_category[n].get(outcome) or 0) for n in names]
        ax.bar(range(len(names)), counts, bottom=bottom, color=OUTCOME_COLORS[outcome],
               label=outcome, width=0.7)  # fmt: skip
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=40,
                  ha="right", fontsize=8)  # fmt: skip
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("harmful prompts")
    ev = results.get("eval") or {}
    outcomes = ev.get("outcomes") or {}
    total = " ".join(f"{o} {outcomes.get(o, 'n/a')}" for o in OUTCOMES)
    ax.set_title(
        f"outcomes by harm category (edited model; all: {total} of {ev.get('n_harmful')})\n"
        f"{_trial_title(results)}",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def write_trial_figures(results: dict[str, Any], trial_dir: str | Path) -> dict[str, Path]:
    """Draw a trial's figures into ``<trial_dir>/plots/``.

    Returns:
        {W&B key (``TRIAL_FIGURES``): path} of the figures drawn (one needs data the trial has).
    """
    plots_dir = Path(trial_dir) / PLOTS_DIR
    drawers = {
        "figures/direction_cosines": plot_trial_cosines,
        "figures/geometry": plot_trial_geometry,
        "figures/outcomes_by_category": plot_trial_outcomes,
    }
    written = {}
    for key, draw in drawers.items():
        path = draw(results, plots_dir / TRIAL_FIGURES[key])
        if path is not None:
            written[key] = path
    return written


def trial_figures(trial_dir: str | Path) -> dict[str, Path]:
    """{W&B key: path} of the figures already in ``<trial_dir>/plots/``."""
    plots_dir = Path(trial_dir) / PLOTS_DIR
    return {
        k: plots_dir / name for k, name in TRIAL_FIGURES.items() if (plots_dir / name).is_file()
    }


# --- study views (frames from abliterate.report) ------------------------------------------------


def _setting_colors(settings: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(settings) <= 10 else "tab20"]
    return {s: palette(i % palette.N) for i, s in enumerate(settings)}


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows no other row beats in both ``x`` and ``y`` (lower is better), sorted by ``x``; of
    rows equal in both, the first."""
    ordered = points.dropna(subset=[x, y]).sort_values([x, y], kind="mergesort")
    front, best = [], math.inf
    for index, row in ordered.iterrows():
        if row[y] < best:
            front.append(index)
            best = row[y]
    return ordered.loc[front]


def plot_refusal_vs_kl(cells: pd.DataFrame, path: Path) -> Path:
    """Every cell's harmful REFUSE rate against its KL, a colour per setting, and each setting's
    Pareto front (no other cell of the setting has both fewer refusals and lower KL) as a step
    line, its cells labelled ``L<layer> w=<weight>``. Filled markers: COMPLY rate >= 0.5."""
    figure = Figure(figsize=(11.5, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    settings = list(dict.fromkeys(cells["setting"]))
    colors = _setting_colors(settings)
    drawn = cells.dropna(subset=["kl_divergence", "refusal_rate"])
    positive = bool(len(drawn)) and bool((drawn["kl_divergence"] > 0).all())
    if positive:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_ylim(-0.03, 1.05)
    if len(drawn):
        low, high = drawn["kl_divergence"].min(), drawn["kl_divergence"].max()
        ax.set_xlim(low / 1.6 if positive else -1e-5, high * 1.6 if high > 0 else 1e-3)
    placed: list[tuple[float, float]] = []  # label positions (pixels), so labels do not overlap
    for rank, setting in enumerate(settings):
        mine = drawn[drawn["setting"] == setting]
        if mine.empty:
            continue
        complying = mine["comply_rate"].fillna(0) >= 0.5
        color = colors[setting]
        ax.scatter(mine.loc[complying, "kl_divergence"], mine.loc[complying, "refusal_rate"],
                   color=color, s=28, alpha=0.85, zorder=3)  # fmt: skip
        ax.scatter(mine.loc[~complying, "kl_divergence"], mine.loc[~complying, "refusal_rate"],
                   facecolors="none", edgecolors=color, s=28, alpha=0.85, zorder=3)  # fmt: skip
        front = pareto_front(mine, "kl_divergence", "refusal_rate")
        # settings drawn first are drawn wider, so fronts that coincide stay visible
        width = 3.4 - 2.2 * rank / max(len(settings) - 1, 1)
        ax.step(front["kl_divergence"], front["refusal_rate"], where="post", color=color,
                linewidth=width, alpha=0.9, label=f"{setting} ({len(mine)} cells)")  # fmt: skip
        for _, row in front.iterrows():
            x, y = ax.transData.transform((row["kl_divergence"], row["refusal_rate"]))
            if any(abs(x - px) < 48 and abs(y - py) < 11 for px, py in placed):
                continue
            placed.append((x, y))
            ax.annotate(f"L{row['layer']} w={row['weight']:g}",
                        (row["kl_divergence"], row["refusal_rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=6.5, color=color)  # fmt: skip
    ax.set_xlabel("KL(original || edited), nats (log scale)")
    ax.set_ylabel("harmful REFUSE rate")
    ax.set_title(
        "refusal vs KL per setting: step line = Pareto front (lower left is better); "
        "filled = COMPLY rate >= 0.5",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(figure, path)


def _cell_labels(frame: pd.DataFrame) -> list[str]:
    """``L<layer> w=<weight>`` per row; just ``L<layer>`` when every row has one weight."""
    one_weight = frame["weight"].nunique() <= 1
    return [
        f"L{layer}" if one_weight else f"L{layer}\nw={weight:g}"
        for layer, weight in zip(frame["layer"], frame["weight"], strict=True)
    ]


def plot_category_heatmaps(by_category: pd.DataFrame, path: Path) -> Path:
    """Per setting: harm category x (layer, weight) heatmap of the harmful REFUSE rate, each cell
    written as its count out of n; a first column with the unedited model's rate where known."""
    settings = list(dict.fromkeys(by_category["setting"]))
    categories = sorted(by_category["category"].unique())
    columns = max(1, min(2, len(settings)))
    rows = math.ceil(len(settings) / columns)
    widest = max(by_category.groupby("setting")[["layer", "weight"]].apply(
        lambda f: len(f.drop_duplicates())).max(), 1)  # fmt: skip
    figure = Figure(
        figsize=(columns * (2.6 + 0.62 * (widest + 1)), rows * (0.32 * len(categories) + 1.6)),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    image = None
    for index, setting in enumerate(settings):
        ax = figure.add_subplot(rows, columns, index + 1)
        mine = by_category[by_category["setting"] == setting]
        table = mine.pivot_table(index="category", columns=["layer", "weight"],
                                 values=["refusal_rate", "refusals", "n"], aggfunc="mean",
                                 dropna=False)  # fmt: skip
        table = table.reindex(categories)
        rate, count, n = (table[v] for v in ("refusal_rate", "refusals", "n"))
        keys = list(rate.columns)
        labels = _cell_labels(pd.DataFrame(keys, columns=["layer", "weight"]))
        unedited = mine.groupby("category")["unedited_refusal_rate"].mean().reindex(categories)
        values = rate.to_numpy()
        if unedited.notna().any():
            values = pd.concat([unedited.rename("unedited"), rate], axis=1).to_numpy()
            labels = ["unedited", *labels]
        image = ax.imshow(values, cmap="Reds", vmin=0, vmax=1, aspect="auto")
        offset = len(labels) - len(keys)
        for i in range(len(categories)):
            for j in range(len(labels)):
                value = values[i, j]
                if not math.isfinite(value):
                    continue
                if j >= offset and math.isfinite(count.iat[i, j - offset]):
                    text = f"{count.iat[i, j - offset]:.0f}/{n.iat[i, j - offset]:.0f}"
                else:
                    text = f"{value:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6,
                        color="white" if value > 0.6 else "black")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(categories)), [c.replace("_", " ") for c in categories],
                      fontsize=7)  # fmt: skip
        if offset:
            ax.axvline(offset - 0.5, color="black", linewidth=1.2)
        ax.set_title(setting, fontsize=9)
    if image is not None:
        figure.colorbar(image, ax=figure.axes, shrink=0.6, label="harmful REFUSE rate")
    figure.suptitle("refusal by harm category and layer (cells: REFUSE count / prompts)",
                    fontsize=11)  # fmt: skip
    return save_figure(figure, path)


SIDE_METRICS = (
    ("harmless_refusal_rate", "generic harmless\nfalse-refusal rate", (-0.03, 1.03)),
    ("matched_harmless_refusal_rate", "matched harmless\nfalse-refusal rate", (-0.03, 1.03)),
    ("capture", "capture\n(share in the directions' span)", (-0.03, 1.03)),
    ("perturbation_ratio", "perturbation ratio\n|edited - original| / |original|", None),
)


def plot_side_effects_vs_layer(cells: pd.DataFrame, path: Path) -> Path:
    """Rows: generic and matched harmless false-refusal rate, capture, perturbation ratio;
    columns: settings; a line per weight against layer (dashed grey: the unedited model's false
    refusals). A setting with one layer shows points."""
    settings = list(dict.fromkeys(cells["setting"]))
    weights = sorted(float(w) for w in cells["weight"].unique())
    from matplotlib import colormaps

    palette = colormaps["viridis"]
    colors = {w: palette(0.1 + 0.8 * i / max(len(weights) - 1, 1)) for i, w in enumerate(weights)}
    figure = Figure(figsize=(3.4 * len(settings) + 0.8, 2.5 * len(SIDE_METRICS)),
                    layout="constrained")  # fmt: skip
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(len(SIDE_METRICS), len(settings), squeeze=False, sharey="row")
    for column, setting in enumerate(settings):
        mine = cells[cells["setting"] == setting]
        for row, (metric, title, limits) in enumerate(SIDE_METRICS):
            ax = axes_grid[row][column]
            for weight, line in mine.groupby("weight"):
                line = line.sort_values("layer")
                # lower weights drawn wider, so lines that coincide stay visible
                wide = (len(weights) - 1 - weights.index(weight)) / max(len(weights) - 1, 1)
                ax.plot(line["layer"], line[metric], marker="o", markersize=3 + 3 * wide,
                        linewidth=1 + 2.5 * wide, color=colors[weight], label=f"w={weight:g}")  # fmt: skip
            unedited = f"unedited_{metric}"
            if unedited in mine and mine[unedited].notna().any():
                ax.axhline(mine[unedited].mean(), color="grey", linestyle="--", linewidth=1,
                           label="unedited")  # fmt: skip
            if limits:
                ax.set_ylim(*limits)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(setting, fontsize=9)
            if column == 0:
                ax.set_ylabel(title, fontsize=8)
            if row == len(SIDE_METRICS) - 1:
                ax.set_xlabel("layer")
    handles, labels = axes_grid[0][0].get_legend_handles_labels()
    for ax in figure.axes:  # one legend for all: the union of weights drawn
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    figure.suptitle("side effects by layer: false refusals on harmless prompts, capture, "
                    "perturbation", fontsize=11)  # fmt: skip
    return save_figure(figure, path)


def plot_outcomes_stacked(cells: pd.DataFrame, path: Path) -> Path:
    """Per setting: the four outcome rates of the harmful prompts stacked, one bar per (layer,
    weight) in layer order, and a first bar for the unedited model."""
    settings = list(dict.fromkeys(cells["setting"]))
    columns = max(1, min(2, len(settings)))
    rows = math.ceil(len(settings) / columns)
    widest = max(cells.groupby("setting").size().max(), 1)
    figure = Figure(figsize=(columns * (1.8 + 0.5 * (widest + 1)), rows * 3.1),
                    layout="constrained")  # fmt: skip
    FigureCanvasAgg(figure)
    for index, setting in enumerate(settings):
        ax = figure.add_subplot(rows, columns, index + 1)
        mine = cells[cells["setting"] == setting].sort_values(["layer", "weight"])
        labels = ["unedited", *_cell_labels(mine)]
        bottom = [0.0] * len(labels)
        for outcome in OUTCOMES:
            key = OUTCOME_RATES[outcome]
            unedited = mine[f"unedited_{key}"].mean() if f"unedited_{key}" in mine else math.nan
            heights = [_nan(unedited), *(_nan(v) for v in mine[key])]
            heights = [0.0 if math.isnan(h) else h for h in heights]
            ax.bar(range(len(labels)), heights, bottom=bottom, color=OUTCOME_COLORS[outcome],
                   width=0.8, label=outcome)  # fmt: skip
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.axvline(0.5, color="black", linewidth=1)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("share of harmful prompts", fontsize=8)
        ax.set_title(setting, fontsize=9)
    handles, labels = figure.axes[0].get_legend_handles_labels() if figure.axes else ([], [])
    figure.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    figure.suptitle("outcomes of the harmful prompts by layer and weight", fontsize=11)
    return save_figure(figure, path)
