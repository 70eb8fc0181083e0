"""Several trials per submitit job: hydra-submitit-launcher's launchers, extended by packing.

``hydra.launcher.trials_per_job=k`` submits a sweep of N trials as a job array of about N / k
jobs. Each job runs its trials one after another in one process, each through the upstream
launcher's own per-trial call (Hydra's ``run_job``: the trial's directory, config files, logging
and callbacks, exactly as a one-trial job), so the in-process ``Session`` of
``abliterate.pipeline`` is reused: the model loads once per job and the directions of a
(baseline, layer) once per job. ``hydra.launcher.group_by=[baseline, layer]`` keeps the trials
that share those override values in one job.

- Each trial writes its records as it finishes; a requeued or relaunched job runs its whole
  list again and the trials already complete are read back, not rerun (``run_trial``).
- A trial that fails is recorded as failed and the job goes on with the next; a job that dies
  (cancelled, killed, out of time past its requeues) fails the trials it had not finished (each
  finished trial's result is saved beside the job's log as it ends). Once every job
  has ended the launcher logs one line per failed trial and returns every trial's result to the
  sweeper, which then exits non-zero (the basic sweeper raises the first failure; the Optuna
  sweeper records each as a failed trial).
- ``trials_per_job=1`` (the default) is hydra-submitit-launcher's ``launch`` unchanged: one job
  per trial.

Only the launch is new; the upstream launcher builds each trial's config and runs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

Trial = tuple[list[str], int]  # (the trial's overrides, its job number in the sweep)


def group_key(overrides: Sequence[str], group_by: Sequence[str]) -> tuple[str | None, ...]:
    """The values of the ``group_by`` keys among a trial's overrides (None: not overridden)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = {o.key_or_group: o.get_value_element_as_str() for o in parsed}
    return tuple(values.get(key) for key in group_by)


def plan_packs(
    job_overrides: Sequence[Sequence[str]], trials_per_job: int, group_by: Sequence[str] = ()
) -> list[list[int]]:
    """Split a sweep's trials (indices into ``job_overrides``) into packs of at most
    ``trials_per_job``.

    Trials with the same ``group_by`` values form a group. A group fills whole packs in launch
    order; what is left of each group (fewer than ``trials_per_job`` trials) is never split, and
    these rests share packs first-fit, largest first. Without ``group_by`` the packs are the
    sweep in launch order, cut every ``trials_per_job`` trials.
    """
    if trials_per_job < 1:
        raise ValueError(f"trials_per_job must be >= 1, got {trials_per_job}")
    groups: dict[tuple[str | None, ...], list[int]] = {}
    for index, overrides in enumerate(job_overrides):
        groups.setdefault(group_key(overrides, group_by), []).append(index)
    packs: list[list[int]] = []
    rests: list[list[int]] = []
    for members in groups.values():
        whole = len(members) - len(members) % trials_per_job
        packs.extend(members[i : i + trials_per_job] for i in range(0, whole, trials_per_job))
        if whole < len(members):
            rests.append(members[whole:])
    shared: list[list[int]] = []
    for rest in sorted(rests, key=len, reverse=True):  # stable: launch order among equals
        for pack in shared:
            if len(pack) + len(rest) <= trials_per_job:
                pack.extend(rest)
                break
        else:
            shared.append(list(rest))
    return packs + shared


def trial_result_path(folder: str | Path, job_id: str, job_num: int) -> Path:
    """Where a pack saves one trial's ``JobReturn`` (in the job's submitit folder)."""
    return Path(folder) / f"{job_id}_trial{job_num}_result.pkl"


def _saved_result(folder: Path, job_id: str, job_num: int) -> JobReturn | None:
    from submitit.core.utils import pickle_load

    try:
        result = pickle_load(trial_result_path(folder, job_id, job_num))
    except Exception:  # not written (the trial never ended) or unreadable
        return None
    return result if isinstance(result, JobReturn) else None


def _failed(overrides: Sequence[str], error: BaseException) -> JobReturn:
    result = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    result.return_value = error
    return result


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(error, CompactHydraException):
        return message  # already a one-line "error: ..." from run.py
    return f"{type(error).__name__}: {message}"


class TrialPack:
    """What one job of a packed sweep runs: its trials, one after another, in this process.

    A trial's failure is its own: it is returned as a failed ``JobReturn`` and the next trial
    runs. Each trial's ``JobReturn`` is also saved beside the job's log as it ends
    (:func:`trial_result_path`), so a job that dies midway still reports the trials it finished.
    submitit calls :meth:`checkpoint` on preemption or at the time limit and requeues the same
    list; the trials already complete are then skipped by the pipeline.
    """

    def __init__(
        self, launcher: upstream.BaseSubmititLauncher, singleton_state: dict[Any, Any]
    ) -> None:
        self.launcher = launcher
        self.singleton_state = singleton_state

    def __call__(self, trials: list[Trial]) -> list[JobReturn]:
        results = []
        for position, (overrides, job_num) in enumerate(trials, 1):
            try:
                # the upstream per-trial call: the trial's config, hydra.job.id/num, run_job
                result = self.launcher(
                    overrides, "hydra.sweep.dir", job_num, f"job_id_for_{job_num}",
                    self.singleton_state,
                )  # fmt: skip
            except Exception as error:  # its config could not be composed: run_job never ran
                result = _failed(overrides, error)
            state = "done" if result.status == JobStatus.COMPLETED else "FAILED"
            detail = "" if state == "done" else f": {_first_line(result._return_value)}"
            print(
                f"[pack] trial {position}/{len(trials)} #{job_num} "
                f"{' '.join(filter_overrides(overrides))}: {state}{detail}",
                flush=True,
            )
            results.append(result)
            self._save(result, job_num)
        return results

    @staticmethod
    def _save(result: JobReturn, job_num: int) -> None:
        import submitit
        from submitit.core.utils import cloudpickle_dump

        environment = submitit.JobEnvironment()
        path = trial_result_path(environment.paths.folder, environment.job_id, job_num)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            cloudpickle_dump(result, staging)
            os.replace(staging, path)
        except Exception as error:  # the pack's own result still carries it
            print(f"[pack] could not save trial #{job_num}'s result to {path}: {error}")
            staging.unlink(missing_ok=True)

    def checkpoint(self, trials: list[Trial]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, trials)


class PackedSubmititLauncher(upstream.BaseSubmititLauncher):
    """hydra-submitit-launcher's launcher with ``trials_per_job`` and ``group_by``."""

    def __init__(
        self, trials_per_job: int = 1, group_by: Sequence[str] | None = None, **params: Any
    ) -> None:
        super().__init__(**params)  # the upstream keys only: they go to the executor as they are
        if OmegaConf.is_config(group_by):
            group_by = OmegaConf.to_container(group_by, resolve=True)  # type: ignore[assignment]
        self.trials_per_job = trials_per_job
        self.group_by = [str(key) for key in group_by or []]

    def _check_settings(self) -> None:
        assert self.config is not None
        if not isinstance(self.trials_per_job, int) or self.trials_per_job < 1:
            raise CompactHydraException(
                f"error: hydra.launcher.trials_per_job={self.trials_per_job!r} is not valid; "
                "valid: an integer >= 1 (1: one job per trial)"
            )
        missing = object()
        for key in self.group_by:
            if key.startswith("hydra") or OmegaConf.select(
                self.config, key, default=missing, throw_on_missing=False
            ) is missing:  # fmt: skip
                valid = sorted(k for k in self.config if k != "hydra")
                raise CompactHydraException(
                    f"error: hydra.launcher.group_by: {key!r} is not a key of this config; valid: "
                    f"{', '.join(map(str, valid))}, or a dotted key below them (ablation.weight)"
                )

    def _executor(self) -> Any:
        """The submitit executor, from the same settings the upstream ``launch`` passes it:
        ``max_num_timeout`` at construction, the queue's own keys prefixed by its name."""
        import submitit

        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared_keys else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        return executor

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        self._check_settings()
        if self.trials_per_job == 1:
            return super().launch(job_overrides, initial_job_idx)

        packs = plan_packs(job_overrides, self.trials_per_job, self.group_by)
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        grouping = f", grouped by {', '.join(self.group_by)}" if self.group_by else ""
        log.info(
            f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir} "
            f"({len(job_overrides)} trials in {len(packs)} jobs of up to "
            f"{self.trials_per_job}{grouping})"
        )
        pack_trials: list[list[Trial]] = []
        for number, pack in enumerate(packs):
            log.info(f"\tjob {number}:")
            trials = []
            for index in pack:
                job_num = initial_job_idx + index
                log.info(f"\t\t#{job_num} : {' '.join(filter_overrides(job_overrides[index]))}")
                trials.append((list(job_overrides[index]), job_num))
            pack_trials.append(trials)
        jobs = executor.map_array(TrialPack(self, Singleton.get_state()), pack_trials)

        results: list[JobReturn | None] = [None] * len(job_overrides)
        for job, pack in zip(jobs, packs, strict=True):
            try:
                pack_results = job.results()[0]
            except Exception as error:  # the job itself died: its unfinished trials failed
                died = CompactHydraException(
                    f"error: job {job.job_id} ended before this trial's result "
                    f"({_first_line(error)}); relaunch the sweep to run its unfinished trials"
                )
                pack_results = [
                    _saved_result(job.paths.folder, job.job_id, initial_job_idx + i)
                    or _failed(job_overrides[i], died)
                    for i in pack
                ]
            for index, result in zip(pack, pack_results, strict=True):
                results[index] = result
        returns = [r for r in results if r is not None]
        assert len(returns) == len(job_overrides)
        failed = [
            (initial_job_idx + i, r)
            for i, r in enumerate(returns)
            if r.status != JobStatus.COMPLETED
        ]
        if failed:
            lines = [
                f"  #{num} {' '.join(filter_overrides(r.overrides or []))}: "
                f"{_first_line(r._return_value)}"
                for num, r in failed
            ]
            log.error(f"{len(failed)} of {len(returns)} trials failed:\n" + "\n".join(lines))
        return returns


class PackedSlurmLauncher(PackedSubmititLauncher, upstream.SlurmLauncher):
    """``hydra/launcher=slurm``: packs as a SLURM job array."""


class PackedLocalLauncher(PackedSubmititLauncher, upstream.LocalLauncher):
    """``hydra/launcher=local``: packs as subprocesses on this machine."""
