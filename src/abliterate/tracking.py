"""Experiment tracking: one W&B run per trial, one per sweep report, and fallbacks that never cost
a result.

    tracker = start_tracking(cfg, output_dir)   # before the trial, so W&B sees its time and fate
    results = run_trial(cfg)                    # writes results.json, completions, directions
    plots.write_trial_figures(results, output_dir)  # drawn by abliterate.plots, logged here
    tracker.log_trial(output_dir)               # results.json -> W&B
    tracker.finish(exit_code)                   # in a `finally`: saves the trial's log file too

    python -m abliterate.tracking sync DIR      # trials that ran without W&B, from their records
    python -m abliterate.report DIR --wandb     # the sweep's report as a run of job_type=report

A trial's run: its id is derived from the trial directory (``run_id``) and opened with
``resume="allow"``, so a requeue, a relaunch or ``force=true`` updates one run instead of adding
one (offline, the superseded offline run directory moves to ``wandb/superseded/``). The resolved
config plus the trial's resolved ``trial`` block (layer, weight, baseline ... as config columns);
tags ``model:``, ``baseline:``, ``extraction:`` (``+svd``), ``combine:``, ``judge:``; namespaced
metrics (``eval/``, ``baseline/``, ``geometry/``, ``timing/``, ``directions/``) written once to
the run summary (a trial has no step axis, so no one-point line charts); a per-category table,
every completion as a table, the trial's figures, directions.safetensors as an artifact, and the
trial's log file (``<trial>/*.log``, Hydra's job log). Runs are grouped by sweep.

W&B's own environment variables win over the config: ``WANDB_MODE`` (``disabled`` means no run),
``WANDB_PROJECT``, ``WANDB_ENTITY``, ``WANDB_RUN_GROUP``, ``WANDB_JOB_TYPE``, ``WANDB_TAGS``
(added to ``logger.tags``), ``WANDB_DIR``, ``WANDB_SILENT`` and ``WANDB_CONSOLE``; unset, W&B's
console output is off (the trial's log has what matters).

Every W&B call is guarded. If ``wandb.init`` fails (no network, bad key, a crashed service), the
trial logs one warning line and falls back: online -> offline -> no tracking. If logging fails
later, one warning line, and the rest of that trial's W&B logging is skipped. Everything W&B
writes (the run, staged artifacts, its cache and logs) goes under the trial's output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from abliterate import plots, records

log = logging.getLogger(__name__)

# results.json block -> metric namespace; numeric scalars of each block become metrics
METRIC_BLOCKS = (
    ("eval", "eval"),
    ("baseline_eval", "baseline"),
    ("geometry", "geometry"),
    ("timing_s", "timing"),
    ("directions", "directions"),
)
OUTCOMES = ("REFUSE", "EVASIVE", "COMPLY", "INCOHERENT")
CATEGORY_TABLE = "eval/refusal_by_category"
COMPLETIONS_TABLE = "eval/completions"
CATEGORY_COLUMNS = ["category", "n", "refusal_rate", "baseline_refusal_rate", "comply_rate",
                    "evasive_rate"]  # fmt: skip
COMPLETION_COLUMNS = ["set", "index", "category", "label", "baseline_label", "prompt", "response",
                      "baseline_response"]  # fmt: skip
REPORT_TABLE = "report/trials"
SUPERSEDED_DIR = "superseded"  # <wandb dir>/superseded/: offline runs a rerun replaced
# set in the trial's output directory unless the user set them: artifact staging (kept until a
# later `wandb sync`), W&B's cache and core logs; WANDB_CONFIG_DIR (login settings) is left alone
DIRECTORY_VARIABLES = {"WANDB_DATA_DIR": "wandb/data", "WANDB_CACHE_DIR": "wandb/cache"}
SERVICE_PROCESSES = ("wandb-core", "wandb-symon")
# logger.<key> -> the W&B environment variable that wins over it when set
ENVIRONMENT = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "group": "WANDB_RUN_GROUP",
    "job_type": "WANDB_JOB_TYPE",
}
MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older names for the modes


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def trial_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The namespaced scalar metrics of a trial, e.g. ``eval/refusal_rate``, ``geometry/capture``,
    ``eval/outcomes/COMPLY``, ``eval/refusal_rate_by_category/hacking_cybersecurity``. Non-finite
    values are left out."""
    metrics: dict[str, float] = {}
    for block, prefix in METRIC_BLOCKS:
        for key, value in (results.get(block) or {}).items():
            if _finite_number(value):
                metrics[f"{prefix}/{key}"] = value
    for block, prefix in (("eval", "eval"), ("baseline_eval", "baseline")):
        outcomes = (results.get(block) or {}).get("outcomes") or {}
        for outcome in OUTCOMES:
            if _finite_number(outcomes.get(outcome)):
                metrics[f"{prefix}/outcomes/{outcome}"] = outcomes[outcome]
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


def artifact_name(results: dict[str, Any]) -> str:
    """``directions-<model>-<baseline>-<extraction>[-svd]-L<layer>``: trials that share directions
    (a weight sweep) log versions of one artifact, which W&B deduplicates by content."""
    trial = results["trial"]
    model = trial.get("model_name") or Path(str(trial["model"])).name
    svd = "-svd" if trial.get("orthogonalize") == "svd" else ""
    name = f"directions-{model}-{trial['baseline']}-{trial['extraction']}{svd}-L{trial['layer']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:128]


def trial_tags(trial: dict[str, Any]) -> list[str]:
    """``model:<name>``, ``baseline:``, ``extraction:`` (``+svd`` after SVD), ``combine:`` and
    ``judge:`` of a trial block (results.json's ``trial``), for filtering runs in the dashboard."""
    extraction = str(trial.get("extraction", ""))
    if trial.get("orthogonalize") == "svd":
        extraction += "+svd"
    values = {
        "model": trial.get("model_name") or Path(str(trial.get("model", ""))).name,
        "baseline": trial.get("baseline"),
        "extraction": extraction,
        "combine": trial.get("combine"),
        "judge": trial.get("judge"),
    }
    return [f"{key}:{value}"[:64] for key, value in values.items() if value]


def _config_trial(cfg: DictConfig) -> dict[str, Any]:
    """The tag-relevant part of a trial block, from the config (before the trial ran)."""
    from abliterate.ablation import effective_combine

    return {
        "model_name": cfg.model.name,
        "baseline": cfg.baseline.name,
        "extraction": cfg.extraction.method,
        "orthogonalize": cfg.extraction.orthogonalize,
        "combine": effective_combine(cfg.ablation, cfg.extraction.orthogonalize),
        "judge": cfg.judge.name,
    }


def run_id(directory: str | Path, kind: str = "trial") -> str:
    """A W&B run id derived from a directory's absolute path: the same trial (a requeue, a
    relaunch, ``force=true``) always logs to the same run."""
    digest = hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    return f"{kind}-{digest}"


def wandb_dir(output_dir: str | Path) -> Path:
    """Where W&B puts a run's directory: ``$WANDB_DIR/wandb`` if set, else ``<output_dir>/wandb``."""
    return Path(os.environ.get("WANDB_DIR") or output_dir) / "wandb"


def has_run(output_dir: str | Path) -> bool:
    """Whether a trial has a W&B run (online or offline): in its own ``<trial>/wandb``, one of any
    id (runs from before ids were derived included); in a ``$WANDB_DIR`` that every trial shares,
    only one with the trial's own id (``run_id``), not another trial's."""
    if os.environ.get("WANDB_DIR"):
        return any(wandb_dir(output_dir).glob(f"*run-*-{run_id(output_dir)}"))
    return any(wandb_dir(output_dir).glob("*run-*-*"))


def _supersede_offline_runs(output_dir: Path, identifier: str) -> list[Path]:
    """Move earlier offline runs of ``identifier`` to ``wandb/superseded/``: a rerun replaces
    them (as results.json.superseded), so ``wandb sync <trial>/wandb/offline-run-*`` uploads one
    run, the current one."""
    moved = []
    root = wandb_dir(output_dir)
    for old in sorted(root.glob(f"offline-run-*-{identifier}")):
        target = root / SUPERSEDED_DIR / old.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        old.rename(target)
        moved.append(target)
    return moved


@dataclass
class LoggerSettings:
    """``cfg.logger`` with W&B's environment variables applied (they win when set)."""

    mode: str = "offline"
    project: str = "abliterate"
    entity: str | None = None
    group: str | None = None
    job_type: str = "trial"
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 20.0
    finish_timeout_s: float = 120.0

    @classmethod
    def from_config(cls, logger: Any) -> LoggerSettings:
        get = logger.get if hasattr(logger, "get") else lambda key, default=None: default
        settings = cls(
            mode=str(get("mode", "offline")),
            project=str(get("project", "abliterate") or "abliterate"),
            entity=get("entity", None),
            group=get("group", None),
            job_type=str(get("job_type", "trial") or "trial"),
            tags=[str(t) for t in (get("tags", None) or [])],
            init_timeout_s=float(get("init_timeout_s", 20.0)),
            finish_timeout_s=float(get("finish_timeout_s", 120.0)),
        )
        for key, variable in ENVIRONMENT.items():
            if os.environ.get(variable):
                setattr(settings, key, os.environ[variable])
        settings.mode = MODE_ALIASES.get(settings.mode, settings.mode)
        extra = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
        settings.tags += [t for t in extra if t not in settings.tags]
        return settings


def sweep_group(cfg: DictConfig, output_dir: Path) -> str:
    """The W&B group: ``logger.group`` (or ``WANDB_RUN_GROUP``), else the Hydra sweep directory
    (multirun) or run directory, else the trial's output directory, as an absolute path (so that
    ``sync`` and the report run find the same group: ``sweep_group_of``)."""
    configured = LoggerSettings.from_config(cfg.get("logger") or {}).group
    if configured:
        return str(configured)
    group = Path(output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            group = Path(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir)
    except Exception:  # no Hydra context: keep the output directory
        pass
    return str(group.resolve())[-128:]


def sweep_group_of(trial_dir: str | Path, root: str | Path) -> str:
    """The group a trial below ``root`` was (or would have been) logged in: its sweep directory
    (a multirun's trial directories are one level below it), or the run directory itself."""
    trial_dir, root = Path(trial_dir).resolve(), Path(root).resolve()
    return str(root if trial_dir == root else trial_dir.parent)[-128:]


class Tracker:
    """No tracking: ``logger=none``, ``disabled``, a skipped trial, or a fallback."""

    name = "none"

    def log_trial(self, output_dir: str | Path) -> None:
        """Send a finished trial's records (results.json and friends) to the tracker."""

    def finish(self, exit_code: int = 0) -> None:
        """End the run (exit code 0: the trial completed) and release everything it holds."""


class WandbTracker(Tracker):
    """A live W&B run of one trial. Every call is guarded; the first failure disables the rest."""

    name = "wandb"

    def __init__(self, wandb: Any, run: Any, output_dir: Path, restore_env: dict[str, str | None]):
        self.wandb, self.run, self.output_dir = wandb, run, output_dir
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
            ("directions artifact", self._log_directions),
            ("tables and figures", self._log_media),
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
        self.run.tags = tuple(dict.fromkeys([*self.run.tags, *trial_tags(results["trial"])]))

    def _log_metrics(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        self.run.summary.update(trial_metrics(results))

    def _log_media(self, results: dict[str, Any], output_dir: Path, completions: list) -> None:
        """One ``log`` call (one step): the category table, every completion, the figures."""
        media: dict[str, Any] = {
            CATEGORY_TABLE: self.wandb.Table(
                columns=CATEGORY_COLUMNS, data=category_rows(results, completions)
            )
        }
        if completions:
            rows = [[row.get(c) for c in COMPLETION_COLUMNS] for row in completions]
            media[COMPLETIONS_TABLE] = self.wandb.Table(columns=COMPLETION_COLUMNS, data=rows)
        for key, path in plots.trial_figures(output_dir).items():
            media[key] = self.wandb.Image(str(path))
        self.run.log(media)

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

    def _save_logs(self) -> None:
        """Copy the trial's log files (Hydra's ``<trial>/<job>.log``) into the run as they are
        now, at its end, so the run holds the whole trial's log."""
        for path in sorted(self.output_dir.glob("*.log")):
            copy = Path(self.run.dir) / path.name
            shutil.copyfile(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            if not self._failed:
                self._save_logs()
        except Exception as error:
            self._warn("saving the log file", error)
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


def _settings(wandb: Any, logger: LoggerSettings) -> Any:
    """Timeouts, and W&B's console output off unless ``WANDB_SILENT`` / ``WANDB_CONSOLE`` say
    otherwise (Hydra already keeps the job's log in the output directory)."""
    options: dict[str, Any] = {
        "init_timeout": logger.init_timeout_s,
        "login_timeout": logger.init_timeout_s,
        "finish_timeout": logger.finish_timeout_s,
    }
    if "WANDB_CONSOLE" not in os.environ:
        options["console"] = "off"
    if "WANDB_SILENT" not in os.environ:
        options["silent"] = True
    return wandb.Settings(**options)


def _open_run(
    logger: LoggerSettings, init: dict[str, Any], output_dir: Path, what: str
) -> tuple[Any, Any, dict[str, str | None]] | None:
    """``wandb.init`` as ``logger`` says, falling back online -> offline -> None, one warning
    line per fallback. Returns (wandb, run, the environment to restore at the end) or None."""
    if logger.mode == "disabled":
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    modes = ["online", "offline"] if logger.mode == "online" else [logger.mode]
    try:
        import wandb
    except Exception as error:
        log.warning("W&B unavailable (%s): no tracking for this %s", _one_line(error), what)
        return None
    failures = []
    for mode in modes:
        previous = _set_directories(output_dir)
        try:
            run = wandb.init(
                **init,
                project=logger.project,
                entity=logger.entity,
                job_type=logger.job_type,
                dir=os.environ.get("WANDB_DIR") or str(output_dir),
                mode=mode,  # type: ignore[arg-type]  # checked: online, offline or disabled
                resume="allow",
                settings=_settings(wandb, logger),
            )
        except Exception as error:
            where = ""
            if mode == "online":  # W&B's message does not always name the server it tried
                where = f"; server {os.environ.get('WANDB_BASE_URL') or 'https://api.wandb.ai'}"
            failures.append(f"{mode} init failed ({_one_line(error)}{where})")
            end_wandb_service(wandb)  # the failed init may have started the service
            _restore(previous)
            continue
        if failures:
            log.warning(
                "W&B %s: logging offline instead (upload later: wandb sync %s)",
                "; ".join(failures),
                Path(run.dir).parent,
            )
        return wandb, run, previous
    log.warning(
        "W&B %s: no tracking for this %s (its local records are written as usual)",
        "; ".join(failures),
        what,
    )
    return None


def start_tracking(cfg: DictConfig, output_dir: str | Path) -> Tracker:
    """Start tracking a trial as ``cfg.logger`` (and W&B's environment variables) say, falling
    back rather than failing.

    ``online`` tries online, then offline; ``offline`` tries offline; a failure of the last is one
    warning line and no tracking; ``disabled`` (``logger.mode`` or ``WANDB_MODE``) is no run.
    Never raises for a W&B problem.

    Returns:
        A tracker whose ``finish`` must be called (in a ``finally``).
    """
    if cfg.logger.name != "wandb":
        return Tracker()
    logger = LoggerSettings.from_config(cfg.logger)
    if logger.mode == "disabled":
        return Tracker()
    output_dir = Path(output_dir)
    identifier = run_id(output_dir)
    try:
        tags = trial_tags(_config_trial(cfg))
    except Exception:  # a config without the trial's groups (a bare sync): tags come later
        tags = []
    _supersede_offline_runs(output_dir, identifier)
    opened = _open_run(
        logger,
        {
            "id": identifier,
            "name": output_dir.name,
            "group": sweep_group(cfg, output_dir),
            "tags": list(dict.fromkeys([*logger.tags, *tags])),
            "config": _run_config(cfg),
        },
        output_dir,
        "trial",
    )
    if opened is None:
        return Tracker()
    wandb, run, previous = opened
    return WandbTracker(wandb, run, output_dir, previous)


# --- the sweep's report as a run -------------------------------------------------------------


def _layer_series(
    trials: Any, value: str
) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """Per (setting, weight): the layers and the mean of ``value`` there, for a line chart."""
    xs, ys, keys = [], [], []
    frame = trials.dropna(subset=[value])
    for (setting, weight), line in frame.groupby(["setting", "trial.weight"], sort=False):
        means = line.groupby("trial.layer")[value].mean().sort_index()
        xs.append([float(x) for x in means.index])
        ys.append([float(y) for y in means.to_numpy()])
        keys.append(f"{setting} w={weight:g}")
    return xs, ys, keys


def _report_media(wandb: Any, trials: Any, written: Sequence[Path]) -> dict[str, Any]:
    """What a report run logs: report.csv's rows (``trials``) as a table, every written figure,
    and line charts of the refusal and compliance rates and KL against layer."""
    media: dict[str, Any] = {REPORT_TABLE: wandb.Table(dataframe=trials)}
    for path in written:
        if path.suffix == ".png":
            media[f"report/{path.stem}"] = wandb.Image(str(path))
    for value, title in (("eval.refusal_rate", "harmful REFUSE rate"),
                         ("eval.comply_rate", "harmful COMPLY rate"),
                         ("eval.kl_divergence", "KL(original || edited)")):  # fmt: skip
        if value in trials and trials[value].notna().any():
            xs, ys, keys = _layer_series(trials, value)
            media[f"by_layer/{value.split('.')[-1]}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"{title} vs layer", xname="layer"
            )
    return media


def log_report(
    out_dir: Path,
    written: Sequence[Path],
    *,
    group: str,
    name: str,
    config: dict[str, Any],
    logger: LoggerSettings,
) -> Path | None:
    """Log a written sweep report as a W&B run of ``job_type=report`` in the sweep's group:
    report.csv as a table, every figure, line charts of the refusal and compliance rates and KL
    against layer (a line per setting and weight), and report.md with every CSV and figure as an
    artifact. The run's id is derived from the report's path, so rerunning the report updates it.

    Args:
        out_dir: the report's directory (its run goes into ``out_dir/wandb``).
        written: the report's files, report.md first and report.csv second.
        group: the sweep's W&B group (the trials' group).
        name: the run's name.
        config: what the report was drawn with (root, judge, min_comply, counts).
        logger: mode, project, entity and timeouts (``job_type`` is set to ``report``).

    Returns:
        The run's directory, or None when W&B is disabled or could not start.
    """
    import pandas as pd

    logger.job_type = "report"
    markdown, trials_csv = Path(written[0]), Path(written[1])
    identifier = run_id(markdown, "report")
    _supersede_offline_runs(Path(out_dir), identifier)
    opened = _open_run(
        logger,
        {
            "id": identifier,
            "name": name,
            "group": group,
            "tags": logger.tags,
            "config": config,
        },  # fmt: skip
        Path(out_dir),
        "report",
    )
    if opened is None:
        return None
    wandb, run, previous = opened
    exit_code = 1
    try:
        run.log(_report_media(wandb, pd.read_csv(trials_csv), written))
        run.summary.update({k: v for k, v in config.items() if isinstance(v, (int, float))})
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"report-{Path(group).name}-{markdown.stem}")
        artifact = wandb.Artifact(slug.strip("_")[:128], type="report", metadata=config)
        for path in written:
            artifact.add_file(str(path), name=Path(path).relative_to(out_dir).as_posix())
        run.log_artifact(artifact)
        exit_code = 0
    except Exception as error:
        log.warning("W&B report logging failed (%s); the report files are complete",
                    _one_line(error))  # fmt: skip
    finally:
        run_dir = Path(run.dir).parent
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:
            log.warning("W&B finish failed (%s)", _one_line(error))
        end_wandb_service(wandb)
        _restore(previous)
    return run_dir


# --- sync: trials that ran without W&B -------------------------------------------------------


def sync_trials(
    root: Path, mode: str = "offline", project: str | None = None, entity: str | None = None,
    force: bool = False,
) -> list[tuple[Path, str]]:  # fmt: skip
    """Log every complete trial below ``root`` that has no W&B run yet (``logger=none``, or W&B
    disabled or broken when it ran) from its records, as the trial itself would have: same id,
    group (its sweep directory), config, tags, metrics, tables, figures (drawn if missing),
    directions artifact and log file. ``force``: also trials that already have a run.

    Returns:
        [(trial directory, what happened)] per trial.
    """
    results = [
        {**r, "_trial_dir": str(directory)} for directory, r in records.complete_trials(root)
    ]
    done: list[tuple[Path, str]] = []
    # the mode asked for wins over $WANDB_MODE (which LoggerSettings lets win over the config)
    previous = {"WANDB_MODE": os.environ.get("WANDB_MODE")}
    os.environ["WANDB_MODE"] = mode
    try:
        _sync_each(results, root, mode, project, entity, force, done)
    finally:
        _restore(previous)
    return done


def _sync_each(
    results: list[dict[str, Any]], root: Path, mode: str, project: str | None,
    entity: str | None, force: bool, done: list[tuple[Path, str]],
) -> None:  # fmt: skip
    for r in results:
        trial_dir = Path(r["_trial_dir"])
        if has_run(trial_dir) and not force:
            done.append((trial_dir, "skipped (has a W&B run; --force logs it again)"))
            continue
        cfg = OmegaConf.create({k: v for k, v in (r.get("config") or {}).items()})
        stored = cfg.get("logger") or {}
        cfg.logger = {
            **OmegaConf.to_container(OmegaConf.create(stored)),  # type: ignore[dict-item]
            "name": "wandb", "mode": mode, "group": sweep_group_of(trial_dir, root),
            "job_type": "trial", "tags": list(stored.get("tags") or []),
        }  # fmt: skip
        cfg.logger.project = project or stored.get("project") or "abliterate"
        cfg.logger.entity = entity or stored.get("entity")
        if not plots.trial_figures(trial_dir):
            plots.write_trial_figures(r, trial_dir)
        tracker = start_tracking(cfg, trial_dir)
        if not isinstance(tracker, WandbTracker):
            done.append((trial_dir, "not logged (W&B disabled or could not start)"))
            continue
        exit_code = 1
        try:
            tracker.log_trial(trial_dir)
            exit_code = 0
        finally:
            tracker.finish(exit_code)
        done.append((trial_dir, f"logged ({tracker.mode}): {tracker.run_dir}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abliterate.tracking",
        description="W&B tools for trials already on disk.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sync = commands.add_parser(
        "sync",
        help="log the complete trials below DIR that ran without W&B, from their records",
        description="Log every complete trial below DIR without a W&B run (logger=none, W&B "
        "disabled or broken) from its results.json, completions.jsonl, directions and log, as "
        "the trial would have: same run id, group (its sweep directory), tags and tables.",
    )
    sync.add_argument("directory", type=Path, help="a sweep (multirun) or trial directory")
    sync.add_argument(
        "--mode", choices=("offline", "online"), default=None,
        help="online: upload now (falls back to offline); offline: write offline runs for a "
        "later `wandb sync` (default: $WANDB_MODE, else offline)",
    )  # fmt: skip
    sync.add_argument("--project", default=None, help="W&B project (default: the trials' own)")
    sync.add_argument("--entity", default=None, help="W&B entity (default: the trials' own)")
    sync.add_argument(
        "--force", action="store_true", help="also trials that already have a W&B run"
    )
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    mode = MODE_ALIASES.get(args.mode or "", args.mode) or MODE_ALIASES.get(
        os.environ.get("WANDB_MODE", ""), os.environ.get("WANDB_MODE") or "offline"
    )
    if mode == "disabled":
        print("WANDB_MODE=disabled: nothing logged (unset it, or pass --mode offline)")
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    done = sync_trials(args.directory, mode, args.project, args.entity, args.force)
    for directory, what in done:
        print(f"{directory}: {what}")
    logged = [what for _, what in done if what.startswith("logged (offline)")]
    print(f"{sum(w.startswith('logged') for _, w in done)} of {len(done)} trial(s) logged")
    if logged:
        print(f"upload the offline runs: wandb sync {args.directory}/*/wandb/offline-run-*")
    return 0 if all(not w.startswith("not logged") for _, w in done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
