"""Packed sweeps: several trials per SLURM job (`hydra.launcher.trials_per_job`).

The SLURM tests launch `run.py -m hydra/launcher=slurm` through a real controller, as
tests/test_slurm.py does (its `Sweep` helper), on a tiny random-init model, and read what the
jobs left behind, with a probe (a Hydra callback that runs inside each job) recording every
model load, direction extraction and `run_trial` call with its process and wall-clock interval:

- a pack killed mid-way (scancel while one of its trials is held just before results.json) is
  reported as such, and the relaunch runs only its unfinished trial; each pack loaded the model
  and extracted its group's directions once;
- a failing trial leaves its pack-mates complete, and the sweep exits non-zero naming it;
- two launches of the same sweep at once never run one trial at the same time: a trial whose
  per-trial lock is held by a live job is skipped at once with one line naming the holder (and
  reported failed by that launch), and each trial runs exactly once.

How trials are split into packs (`plan_packs`) is tested without SLURM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback
from test_slurm import (  # noqa: F401  (slurm_cluster is a fixture)
    LAUNCH_TIMEOUT_S,
    REPO,
    Sweep,
    _results,
    _skip_count,
    _stamps,
    _tiny_experiment,
    _trial_dirs,
    _wait_for,
    _write_experiment,
    needs_slurm,
    slurm_cluster,
)

from hydra_plugins.abliterate_launcher.packed_launcher import group_key, plan_packs

# --- the probe ---------------------------------------------------------------------------------


def _append(path: Path, record: dict) -> None:
    # one short line per write with O_APPEND: lines of concurrent jobs never interleave
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


class Probe(Callback):
    """Test hook run inside each job: log model loads, direction extractions and trials.

    With ``hold`` set, the first trial whose directory name contains it waits (inside
    `run_trial`, so under the trial's lock) until the file ``release`` exists.
    """

    def __init__(self, path: str, tag: str, hold: str = "", release: str = "") -> None:
        self.path, self.tag, self.hold, self.release = Path(path), tag, hold, release

    def on_job_start(self, config, **kwargs) -> None:
        from abliterate import directions, pipeline

        if getattr(pipeline, "_probe_installed", False):  # once per process (a pack runs many)
            return
        pipeline._probe_installed = True
        probe = self
        load_model, extract, run_trial = (
            pipeline.load_model, directions.extract_directions, pipeline.run_trial
        )  # fmt: skip

        def event(kind: str, **fields) -> dict:
            return {"event": kind, "tag": probe.tag, "pid": os.getpid(), **fields}

        def counted_load(*args, **kwargs):
            _append(probe.path, event("load"))
            return load_model(*args, **kwargs)

        def counted_extract(harmful, categories, baseline, *args, **kwargs):
            _append(probe.path, event("directions", baseline=baseline, layer=args[-1]))
            return extract(harmful, categories, baseline, *args, **kwargs)

        def timed_trial(cfg, output_dir=None, *args, **kwargs):
            results = Path(output_dir or cfg.paths.output_dir) / "results.json"
            before = results.stat().st_mtime_ns if results.exists() else None
            start = time.time()
            if probe.hold and probe.hold in results.parent.name:
                probe.hold = ""  # the first such trial only
                _append(probe.path, event("held", dir=results.parent.name))
                deadline = time.monotonic() + 300
                while not Path(probe.release).exists() and time.monotonic() < deadline:
                    time.sleep(0.5)
            try:
                return run_trial(cfg, output_dir, *args, **kwargs)
            finally:
                after = results.stat().st_mtime_ns if results.exists() else None
                _append(probe.path, event(
                    "trial", dir=results.parent.name, start=start, end=time.time(),
                    ran=after is not None and after != before,
                ))  # fmt: skip

        pipeline.load_model = counted_load
        directions.extract_directions = counted_extract
        pipeline.run_trial = timed_trial


def _probe_args(path: Path, tag: str, hold: str = "", release: Path | None = None) -> list[str]:
    args = [
        "+hydra.callbacks.probe._target_=test_slurm_packing.Probe",
        f"+hydra.callbacks.probe.path={path}",
        f"+hydra.callbacks.probe.tag={tag}",
    ]
    if hold:
        args += [
            f"+hydra.callbacks.probe.hold='{hold}'",
            f"+hydra.callbacks.probe.release={release}",
        ]
    return args


def _events(path: Path, kind: str, tag: str | None = None) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return [r for r in records if r["event"] == kind and (tag is None or r["tag"] == tag)]


@pytest.fixture
def tiny_sweep(tmp_path, slurm_cluster, tiny_model_dir):  # noqa: F811
    cache_dir = tmp_path / "cache"
    _write_experiment(tmp_path, "slurm_test", _tiny_experiment(tiny_model_dir, cache_dir))
    made: list[Sweep] = []

    def make(*grid: str) -> Sweep:
        sweep = Sweep(tmp_path, "slurm_test", cache_dir, grid=grid)
        made.append(sweep)
        return sweep

    yield make
    for sweep in made:
        sweep.cleanup()


# --- packing, without SLURM --------------------------------------------------------------------


def _grid(**axes: list[str]) -> list[list[str]]:
    rows: list[list[str]] = [[]]
    for key, values in axes.items():
        rows = [row + [f"{key}={value}"] for row in rows for value in values]
    return rows


def test_packs_cut_the_sweep_in_launch_order_without_grouping():
    grid = _grid(baseline=["matched", "unmatched"], layer=["1", "2", "3"])
    assert plan_packs(grid, 1) == [[i] for i in range(6)]
    assert plan_packs(grid, 4) == [[0, 1, 2, 3], [4, 5]]
    assert plan_packs(grid, 6) == [list(range(6))]
    assert plan_packs(grid, 10) == [list(range(6))]


def test_packs_keep_groups_together_and_split_only_groups_larger_than_a_pack():
    grid = _grid(baseline=["matched", "unmatched"], layer=["1", "2"], weight=["0.5", "1.0"])
    # 8 trials, 2 per (baseline, layer) group: two groups fill each pack of 4
    packs = plan_packs(grid, 4, ["baseline", "layer"])
    assert packs == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # by baseline: one group of 4 per pack; with packs of 3 a group of 4 fills one pack and its
    # rest (one trial per baseline) shares the last pack
    assert plan_packs(grid, 4, ["baseline"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_packs(grid, 3, ["baseline"]) == [[0, 1, 2], [4, 5, 6], [3, 7]]
    # groups of 3 with packs of 4: never split, one group per pack
    grid = _grid(baseline=["matched", "unmatched", "x"], layer=["1", "2", "3"])
    for packs in (plan_packs(grid, 4, ["baseline"]), plan_packs(grid, 5, ["baseline"])):
        assert packs == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    # every trial is in exactly one pack, whatever the sizes
    for size in range(1, 10):
        packs = plan_packs(grid, size, ["layer"])
        assert sorted(i for pack in packs for i in pack) == list(range(9))
        assert all(0 < len(pack) <= size for pack in packs)


def test_group_keys_read_override_values():
    assert group_key(["baseline=matched", "+foo=3", "layer=2"], ["baseline", "foo", "x"]) == (
        "matched", "3", None,
    )  # fmt: skip
    with pytest.raises(ValueError):
        plan_packs([["layer=1"]], 0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.launcher.group_by=[baselin]",
         "error: hydra.launcher.group_by: 'baselin' is not a key of this config; valid: ablation, "),
        ("hydra.launcher.trials_per_job=0",
         "error: hydra.launcher.trials_per_job=0 is not valid; valid: an integer >= 1"),
    ],
)  # fmt: skip
def test_bad_packing_settings_fail_before_any_job(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "run.py", "-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}",
         "hydra.launcher.trials_per_job=2", override, "layer=1,2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / ".submitit").exists()


# --- packed sweeps on SLURM --------------------------------------------------------------------


@needs_slurm
def test_killed_pack_is_relaunched_and_runs_only_its_unfinished_trials(tiny_sweep, tmp_path):
    sweep = tiny_sweep("baseline=matched,unmatched", "ablation.weight=0.5,1.0")
    probe = tmp_path / "probe.jsonl"
    marker = tmp_path / "held-job"
    packing = ["hydra.launcher.trials_per_job=2", "hydra.launcher.group_by=[baseline]"]
    # the second trial of the unmatched pack is held just before its results.json, then killed
    process, log = sweep.start(
        *packing,
        *_probe_args(probe, "first"),
        "+hydra.callbacks.hold._target_=test_slurm.HoldBeforeResults",
        "+hydra.callbacks.hold.baseline=unmatched",
        "+hydra.callbacks.hold.weight=1.0",
        f"+hydra.callbacks.hold.marker={marker}",
    )
    _wait_for(lambda: marker.exists() or process.poll() is not None, LAUNCH_TIMEOUT_S,
              "the held trial to reach results.json")  # fmt: skip
    assert marker.exists(), f"the sweep ended before the held trial:\n{log.read_text()}"
    subprocess.run(["scancel", marker.read_text()], check=True)
    code = sweep.finish(process, log)
    output = log.read_text()
    assert code != 0, output
    # the dead job's finished trial is not reported; its unfinished one is, naming the job
    assert "1 of 4 trials failed" in output, output[-3000:]
    assert "baseline=unmatched ablation.weight=1.0: error: job" in output, output[-3000:]

    trials = {(r["baseline"], r["weight"]): t for t in _trial_dirs(sweep.dir)
              if (r := _trial_config(t))}  # fmt: skip
    assert len(trials) == 4
    killed = trials[("unmatched", 1.0)]
    assert _results(killed) is None and (killed / "directions.safetensors").is_file()
    finished = [t for key, t in trials.items() if key != ("unmatched", 1.0)]
    assert all(_results(t) is not None for t in finished)
    # two packs, one per baseline: each loaded the model once and extracted its directions once
    loads = _events(probe, "load", "first")
    assert len(loads) == 2 and len({e["pid"] for e in loads}) == 2, loads
    extractions = _events(probe, "directions", "first")
    assert sorted(e["baseline"] for e in extractions) == ["matched", "unmatched"], extractions
    before = _stamps([t / "results.json" for t in finished])

    # the relaunch runs the killed trial only; the pack's other trial is read back
    sweep.run(*packing, *_probe_args(probe, "again"))
    assert _stamps([t / "results.json" for t in finished]) == before
    assert [_skip_count(t) for t in finished] == [1, 1, 1]
    assert _skip_count(killed) == 0 and _results(killed) is not None
    ran = [e["dir"] for e in _events(probe, "trial", "again") if e["ran"]]
    assert ran == [killed.name], ran


def _trial_config(trial: Path) -> dict | None:
    from omegaconf import OmegaConf

    config = OmegaConf.load(trial / ".hydra" / "config.yaml")
    return {"baseline": config.baseline.name, "weight": float(config.ablation.weight)}


@needs_slurm
def test_failing_trial_leaves_its_pack_mates_complete(tiny_sweep, tmp_path):
    sweep = tiny_sweep("layer=0,9,1")  # the tiny model has 3 layers: layer=9 fails
    probe = tmp_path / "probe.jsonl"
    process, log = sweep.start("hydra.launcher.trials_per_job=3", *_probe_args(probe, "pack"))
    code = sweep.finish(process, log)
    output = log.read_text()
    assert code != 0, output
    assert "1 of 3 trials failed" in output, output[-3000:]
    assert "#1 experiment=slurm_test layer=9: error: layer=9 is outside" in output, output[-3000:]
    trials = {t.name: _results(t) for t in _trial_dirs(sweep.dir)}
    assert len(trials) == 3
    complete = sorted(r["trial"]["layer"] for r in trials.values() if r is not None)
    assert complete == [0, 1], trials.keys()
    # one job: the three trials ran in one process with one model load
    assert {e["pid"] for e in _events(probe, "trial")} == {_events(probe, "load")[0]["pid"]}
    assert len(_events(probe, "load")) == 1
    job_log = sweep.job_logs()
    assert (
        job_log.count("[pack] trial") == 3
        and "3/3 #2 experiment=slurm_test layer=1: done" in job_log
    )


@needs_slurm
def test_two_launches_of_one_sweep_never_run_a_trial_at_the_same_time(tiny_sweep, tmp_path):
    sweep = tiny_sweep("ablation.weight=0.25,0.5,0.75,1.0")
    probe, release = tmp_path / "probe.jsonl", tmp_path / "release"
    packing = ["hydra.launcher.trials_per_job=4"]
    # launch A holds its first trial (under that trial's lock) until `release` exists
    first, first_log = sweep.start(*packing, *_probe_args(probe, "A", "weight=0.25", release))
    _wait_for(lambda: _events(probe, "held") or first.poll() is not None, LAUNCH_TIMEOUT_S,
              "launch A to hold its first trial")  # fmt: skip
    assert _events(probe, "held"), first_log.read_text()
    # launch B of the same sweep while A runs: it must skip the held trial at once (not wait for
    # it) and run the three others
    second, second_log = sweep.start(*packing, *_probe_args(probe, "B"))
    code_b = sweep.finish(second, second_log)
    assert first.poll() is None, "launch A ended while its trial was held"
    release.touch()
    code_a = sweep.finish(first, first_log)

    output_b = second_log.read_text()
    assert code_b != 0 and "1 of 4 trials failed" in output_b, output_b[-3000:]
    assert "ablation.weight=0.25: error: " in output_b and "is being run by" in output_b
    assert code_a == 0, first_log.read_text()[-3000:]
    trials = _trial_dirs(sweep.dir)
    assert len(trials) == 4 and all(_results(t) is not None for t in trials)
    runs = _events(probe, "trial")
    ran = sorted((e["dir"], e["tag"]) for e in runs if e["ran"])
    # each trial ran exactly once: the held one by A, the others by B (A then read them back)
    assert [tag for _, tag in ran] == ["A", "B", "B", "B"], ran
    assert len({d for d, _ in ran}) == 4
    # and no two calls for one trial overlapped in time, whichever launch made them
    for trial in {e["dir"] for e in runs}:
        spans = sorted((e["start"], e["end"]) for e in runs if e["dir"] == trial)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"{trial} ran twice at once: {spans}"
    job_logs = sweep.job_logs()
    assert job_logs.count("is being run by") == 1, job_logs[-3000:]
