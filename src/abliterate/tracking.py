"""Experiment tracking: one W&B run per trial, and fallbacks that never cost a result.

    tracker = start_tracking(cfg, output_dir)   # before the trial, so W&B sees its time and fate
    results = run_trial(cfg)                    # writes results.json, completions, directions
    tracker.log_trial(output_dir)               # results.json -> W&B
    tracker.finish(exit_code)                   # in a `finally`: the W&B service always ends

What a run gets: the resolved config (plus the trial's resolved ``trial`` block, so baseline,
layer and weight are config columns), namespaced metrics (``eval/``, ``baseline/``,
``geometry/``, ``timing/``, ``directions/``), a per-category refusal table, a sample of the
completions, the direction cosine matrix and the contrast geometry as images, and
directions.safetensors as an artifact. Runs are grouped by sweep.

Every W&B call is guarded. If ``wandb.init`` fails (no network, bad key, a crashed service), the
trial logs one warning line and falls back: online -> offline -> no tracking. If logging fails
later, one warning line, and the rest of that trial's W&B logging is skipped. Everything W&B
writes (the run, staged artifacts, its cache and logs) goes under the trial's output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from abliterate import records

log = logging.getLogger(__name__)

# results.json block -> metric namespace; numeric scalars of each block become metrics
METRIC_BLOCKS = (
    ("eval", "eval"),
    ("baseline_eval", "baseline"),
    ("geometry", "geometry"),
    ("timing_s", "timing"),
    ("directions", "directions"),
)
CATEGORY_TABLE = "eval/refusal_by_category"
COMPLETIONS_TABLE = "eval/completions"
CATEGORY_COLUMNS = ["category", "n", "refusal_rate", "baseline_refusal_rate", "comply_rate",
                    "evasive_rate"]  # fmt: skip
COMPLETION_COLUMNS = ["set", "category", "label", "baseline_label", "prompt", "response",
                      "baseline_response"]  # fmt: skip
PLOTS_DIR = "plots"
# set in the trial's output directory unless the user set them: artifact staging (kept until a
# later `wandb sync`), W&B's cache and core logs; WANDB_CONFIG_DIR (login settings) is left alone
DIRECTORY_VARIABLES = {"WANDB_DATA_DIR": "wandb/data", "WANDB_CACHE_DIR": "wandb/cache"}
SERVICE_PROCESSES = ("wandb-core", "wandb-symon")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def trial_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The namespaced scalar metrics of a trial, e.g. ``eval/refusal_rate``, ``geometry/capture``,
    ``eval/refusal_rate_by_category/hacking_cybersecurity``. Non-finite values are left out."""
    metrics: dict[str, float] = {}
    for block, prefix in METRIC_BLOCKS:
        for key, value in (results.get(block) or {}).items():
            if _finite_number(value):
                metrics[f"{prefix}/{key}"] = value
    by_category = (results.get("eval") or {}).get("refusal_rate_by_category") or {}
    for category, rate in by_category.items():
        if _finite_number(rate):
            metrics[f"eval/refusal_rate_by_category/{category}"] = rate
    return metrics


def read_completions(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / records.COMPLETIONS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def category_rows(results: dict[str, Any], completions: list[dict[str, Any]]) -> list[list[Any]]:
    """Per harm category: n, the ablated and unedited refusal rates, comply and evasive rates.

    The refusal rate is results.json's; the rest is counted from the harmful completions."""
    harmful = [row for row in completions if row.get("set") == "harmful"]
    rows = []
    for category, rate in sorted(results["eval"].get("refusal_rate_by_category", {}).items()):
        mine = [row for row in harmful if (row.get("category") or "") == category]
        n = len(mine)

        def share(key: str, label: str, rows_: list[dict[str, Any]] = mine, n_: int = n) -> Any:
            return sum(row.get(key) == label for row in rows_) / n_ if n_ else None

        rows.append(
            [
                category,
                n,
                rate,
                share("baseline_label", "REFUSE"),
                share("label", "COMPLY"),
                share("label", "EVASIVE"),
            ]
        )
    return rows


def sample_completions(completions: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to ``k`` completions, round-robin over (set, category) so every stratum shows up."""
    strata: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in completions:
        strata.setdefault((row.get("set", ""), row.get("category") or ""), []).append(row)
    queues = [list(rows) for _, rows in sorted(strata.items())]
    sample: list[dict[str, Any]] = []
    while len(sample) < k and any(queues):
        for queue in queues:
            if queue and len(sample) < k:
                sample.append(queue.pop(0))
    return sample


def artifact_name(results: dict[str, Any]) -> str:
    """``directions-<model>-<baseline>-<extraction>[-svd]-L<layer>``: trials that share directions
    (a weight sweep) log versions of one artifact, which W&B deduplicates by content."""
    trial = results["trial"]
    model = trial.get("model_name") or Path(str(trial["model"])).name
    svd = "-svd" if trial.get("orthogonalize") == "svd" else ""
    name = f"directions-{model}-{trial['baseline']}-{trial['extraction']}{svd}-L{trial['layer']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:128]


def sweep_group(cfg: DictConfig, output_dir: Path) -> str:
    """The W&B group: ``logger.group``, else the Hydra sweep directory (multirun) or run
    directory, else the trial's output directory."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    group = str(output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            group = str(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir)
    except Exception:  # no Hydra context: keep the output directory
        pass
    return group[-128:]


def plot_trial_geometry(results: dict[str, Any], output_dir: Path) -> dict[str, Path]:
    """PNGs of the direction cosine matrix and the per-category contrast geometry."""
    from abliterate.report import draw_cosine_heatmap, new_figure, save_figure

    plots = {}
    geometry, trial = results["geometry"], results["trial"]
    title = f"{trial['baseline']} {trial['extraction']}, layer {trial['layer']}"
    matrix = geometry.get("direction_cosines") or []
    if matrix:
        figure, (ax,) = new_figure(1, width=5.5, height=5.0)
        image = draw_cosine_heatmap(ax, matrix, results["directions"].get("labels") or [])
        figure.colorbar(image, ax=ax, shrink=0.8, label="cosine")
        ax.set_title(f"direction cosines\n{title}", fontsize=10)
        plots["geometry/direction_cosines"] = save_figure(
            figure, output_dir / PLOTS_DIR / "direction_cosines.png"
        )
    per_category = geometry.get("per_category") or {}
    to_mean = geometry.get("cosine_to_diff_in_means") or []
    if per_category or to_mean:
        figure, (ratio_ax, cos_ax, mean_ax) = new_figure(3, width=4.5, height=3.8)
        names = sorted(per_category)
        short = [n.replace("_", " ") for n in names]

        def series(key: str) -> list[float]:
            values = [per_category[n].get(key) for n in names]
            return [v if _finite_number(v) else math.nan for v in values]

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
        labels = results["directions"].get("labels") or [str(i) for i in range(len(to_mean))]
        names_to_mean = [str(n).replace("_", " ") for n in labels][: len(to_mean)]
        values_to_mean = [v if _finite_number(v) else math.nan for v in to_mean]
        mean_ax.bar(names_to_mean, values_to_mean, color="tab:green")
        mean_ax.set_title("cos(direction, diff-in-means)", fontsize=10)
        for ax in (ratio_ax, cos_ax, mean_ax):
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            ax.grid(alpha=0.3, axis="y")
        figure.suptitle(title, fontsize=10)
        plots["geometry/contrast"] = save_figure(figure, output_dir / PLOTS_DIR / "geometry.png")
    return plots


class Tracker:
    """No tracking: ``logger=none``, ``logger.mode=disabled``, a skipped trial, or a fallback."""

    name = "none"

    def log_trial(self, output_dir: str | Path) -> None:
        """Send a finished trial's records (results.json and friends) to the tracker."""

    def finish(self, exit_code: int = 0) -> None:
        """End the run (exit code 0: the trial completed) and release everything it holds."""


class WandbTracker(Tracker):
    """A live W&B run of one trial. Every call is guarded; the first failure disables the rest."""

    name = "wandb"

    def __init__(self, wandb: Any, run: Any, cfg: DictConfig, restore_env: dict[str, str | None]):
        self.wandb, self.run, self.cfg = wandb, run, cfg
        self.mode = run.settings.mode
        self.run_dir = Path(run.dir).parent  # <dir>/wandb/<offline-run-...>; run.dir is its files/
        self._restore_env = restore_env
        self._failed = False
        self._finished = False

    def _warn(self, what: str, error: BaseException) -> None:
        if not self._failed:
            log.warning(
                "W&B %s failed (%s); the rest of this trial's W&B logging is skipped, its local "
                "records are complete",
                what,
                _one_line(error),
            )
        self._failed = True

    def log_trial(self, output_dir: str | Path) -> None:
        output_dir = Path(output_dir)
        results = records.read_complete_results(output_dir)
        if results is None or self._failed:
            return
        completions = read_completions(output_dir)
        # most valuable first: a failure skips the stages after it
        stages = (
            ("config", self._log_config),
            ("metrics", self._log_metrics),
            ("category table", self._log_category_table),
            ("directions artifact", self._log_directions),
            ("completions table", self._log_completions),
            ("plots", self._log_plots),
        )
        for what, stage in stages:
            try:
                stage(results, output_dir, completions)
            except Exception as error:  # tracking must never cost the trial
                self._warn(f"logging ({what})", error)
                return

    def _log_config(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        # the resolved trial block (layer after wrapping negatives, weight as float) as columns
        self.run.config.update({"trial": results["trial"]}, allow_val_change=True)

    def _log_metrics(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        self.run.log(trial_metrics(results))

    def _log_category_table(
        self, results: dict[str, Any], output_dir: Path, completions: list
    ) -> None:
        rows = category_rows(results, completions)
        self.run.log({CATEGORY_TABLE: self.wandb.Table(columns=CATEGORY_COLUMNS, data=rows)})

    def _log_completions(
        self, results: dict[str, Any], output_dir: Path, completions: list
    ) -> None:
        sample = sample_completions(completions, int(self.cfg.logger.completions_sample))
        if sample:
            rows = [[row.get(c) for c in COMPLETION_COLUMNS] for row in sample]
            self.run.log(
                {COMPLETIONS_TABLE: self.wandb.Table(columns=COMPLETION_COLUMNS, data=rows)}
            )

    def _log_plots(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        plots = plot_trial_geometry(results, output_dir)
        if plots:
            self.run.log({key: self.wandb.Image(str(path)) for key, path in plots.items()})

    def _log_directions(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        path = output_dir / records.DIRECTIONS_FILE
        if not path.exists():
            return
        metadata = {
            **results["trial"],
            "count": results["directions"]["count"],
            "labels": results["directions"].get("labels"),
            "norms": results["directions"].get("norms"),
        }
        artifact = self.wandb.Artifact(artifact_name(results), type="directions", metadata=metadata)
        artifact.add_file(str(path), name=records.DIRECTIONS_FILE)
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as error:
            self._warn("finish", error)
        finally:
            end_wandb_service(self.wandb)
            _restore(self._restore_env)
        if self.mode == "offline":
            log.info("W&B offline run saved; upload it with: wandb sync %s", self.run_dir)


def _children_named(names: tuple[str, ...]) -> list[Any]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return []
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() in names:
                found.append(child)
        except psutil.Error:
            continue
    return found


def end_wandb_service(wandb: Any) -> None:
    """``wandb.teardown()``, then end any W&B helper process of ours that outlived it.

    A trial owns its process's W&B service from ``start_tracking`` to ``finish``; each trial of an
    in-process sweep starts a fresh one (about a second)."""
    try:
        wandb.teardown()
    except Exception as error:
        log.warning("W&B teardown failed (%s); ending its processes", _one_line(error))
    leftovers = _children_named(SERVICE_PROCESSES)
    for process in leftovers:
        try:
            process.terminate()
        except Exception:
            continue
    if leftovers:
        import psutil

        _, alive = psutil.wait_procs(leftovers, timeout=5)
        for process in alive:
            try:
                process.kill()
            except Exception:
                continue


def _set_directories(output_dir: Path) -> dict[str, str | None]:
    """Point W&B's data and cache directories into the trial's output directory unless the user
    set them; returns what to restore."""
    previous: dict[str, str | None] = {}
    for variable, relative in DIRECTORY_VARIABLES.items():
        if not os.environ.get(variable):
            previous[variable] = os.environ.get(variable)
            directory = output_dir / relative
            directory.mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(directory)
    return previous


def _restore(previous: dict[str, str | None]) -> None:
    for variable, value in previous.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value


def _run_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an interpolation that only resolves inside Hydra
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _init_run(wandb: Any, cfg: DictConfig, output_dir: Path, mode: str) -> Any:
    logger = cfg.logger
    timeout = float(logger.init_timeout_s)
    settings = wandb.Settings(
        init_timeout=timeout,
        login_timeout=timeout,
        finish_timeout=float(logger.finish_timeout_s),
        console="off",  # Hydra already keeps the job's log in the output directory
    )
    return wandb.init(
        project=logger.project,
        entity=logger.entity,
        group=sweep_group(cfg, output_dir),
        name=output_dir.name,
        job_type=logger.job_type,
        tags=list(logger.tags),
        config=_run_config(cfg),
        dir=str(output_dir),
        mode=mode,
        settings=settings,
    )


def start_tracking(cfg: DictConfig, output_dir: str | Path) -> Tracker:
    """Start tracking a trial as ``cfg.logger`` says, falling back rather than failing.

    ``logger.mode=online`` tries online, then offline; ``offline`` tries offline; a failure of
    the last is one warning line and no tracking. Never raises for a W&B problem.

    Returns:
        A tracker whose ``finish`` must be called (in a ``finally``).
    """
    if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled":
        return Tracker()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modes = ["online", "offline"] if cfg.logger.mode == "online" else [str(cfg.logger.mode)]
    failures = []
    try:
        import wandb
    except Exception as error:
        log.warning("W&B unavailable (%s): no tracking for this trial", _one_line(error))
        return Tracker()
    for mode in modes:
        previous = _set_directories(output_dir)
        try:
            tracker = WandbTracker(wandb, _init_run(wandb, cfg, output_dir, mode), cfg, previous)
        except Exception as error:
            failures.append(f"{mode} init failed ({_one_line(error)})")
            end_wandb_service(wandb)  # the failed init may have started the service
            _restore(previous)
            continue
        if failures:
            log.warning(
                "W&B %s: logging offline instead (upload later: wandb sync %s)",
                "; ".join(failures),
                tracker.run_dir,
            )
        return tracker
    log.warning(
        "W&B %s: no tracking for this trial (its local records are written as usual)",
        "; ".join(failures),
    )
    return Tracker()
