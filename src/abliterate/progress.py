"""Where a sweep stands: one line as each trial starts and ends, with elapsed and remaining time.

A Hydra callback (``conf/config.yaml`` registers it under ``hydra.callbacks``). In a multirun
on the basic (in-process) launcher each trial logs, into the console and into its own log file,

    trial 3 of 8 (baseline=matched layer=20): 2m10s elapsed, about 4m20s remaining

where remaining is the mean time of the trials finished so far times the trials left (trials
skipped as complete are quick, so the estimate is pessimistic after a resume and corrects
itself). The size of the sweep is read the way Hydra's basic sweeper expands it (the product of
the comma-separated values), or an Optuna sweeper's ``n_trials``; for other sweepers, and in
SLURM jobs (each job is its own process), the line names the trial without a total.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("abliterate.sweep")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def sweep_size(config: DictConfig) -> int | None:
    """How many trials the launching command expands to, or None when that is not known here."""
    sweeper = config.hydra.sweeper
    target = str(sweeper.get("_target_", ""))
    if target.endswith("BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        overrides = OverridesParser.create().parse_overrides(_sweep_arguments(config))
        batches = BasicSweeper.split_arguments(overrides, None)
        return sum(len(batch) for batch in batches)
    n_trials = sweeper.get("n_trials")
    return int(n_trials) if n_trials is not None else None


def _sweep_arguments(config: DictConfig) -> list[str]:
    """The basic sweeper's arguments: ``hydra.sweeper.params`` from the config, then the command
    line's overrides (a key given on both: the command line's wins, as in the sweeper)."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)


class SweepProgress(Callback):
    """Logs "trial i of n, elapsed, remaining" for each trial of a multirun."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.start: float | None = None
        self.job_start: float | None = None
        self.finished = 0
        self.durations: list[float] = []  # seconds per finished trial, in order
        self.swept: list[str] = []  # the keys the command sweeps over
        self.failed: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.monotonic()
        try:
            parsed = OverridesParser.create().parse_overrides(_sweep_arguments(config))
            self.swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
            self.total = sweep_size(config)
        except Exception as error:  # a sweeper whose syntax this does not follow: no total
            log.debug("sweep size unknown: %s", error)
            self.total = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_start = time.monotonic()
        job = config.hydra.job
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        number = int(job.num) + 1
        of = f" of {self.total}" if self.total else ""
        name = self._name(config)
        timing = ""
        if self.start is not None:
            elapsed = time.monotonic() - self.start
            timing = f": {format_duration(elapsed)} elapsed"
            if self.durations and self.total:
                # the first trial also loads the model and fills the caches: once there are
                # others, they are the better guide to what a trial costs
                typical = self.durations[1:] or self.durations
                left = max(self.total - number + 1, 0) * sum(typical) / len(typical)
                timing += f", about {format_duration(left)} remaining"
        log.info("trial %d%s (%s)%s", number, of, name, timing)

    def _name(self, config: DictConfig) -> str:
        """The trial's values of the swept keys (all its overrides when they are not known)."""
        overrides = [o for o in config.hydra.overrides.task if o.split("=", 1)[0] in self.swept]
        return " ".join(overrides) or str(config.hydra.job.override_dirname) or "no overrides"

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self.finished += 1
        if self.job_start is not None:
            self.durations.append(time.monotonic() - self.job_start)
        status = getattr(getattr(job_return, "status", None), "name", "COMPLETED")
        if status == "FAILED":
            self.failed.append(str(config.hydra.job.override_dirname or config.hydra.job.num))
        if self.job_start is not None and config.hydra.mode == RunMode.MULTIRUN:
            log.info(
                "trial %d %s in %s",
                int(config.hydra.job.num) + 1,
                "failed" if status == "FAILED" else "finished",
                format_duration(time.monotonic() - self.job_start),
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.start is None:
            return
        # printed, not logged: after the first trial the log handlers write into a trial's file
        elapsed = format_duration(time.monotonic() - self.start)
        if not self.finished:  # the trials ran in jobs of their own (SLURM, local executor)
            print(
                f"sweep: launched and waited {elapsed}; each job's log has its trials", flush=True
            )
            return
        failed = f"; {len(self.failed)} failed: {', '.join(self.failed)}" if self.failed else ""
        print(f"sweep: {self.finished} trials in {elapsed}{failed}", flush=True)
