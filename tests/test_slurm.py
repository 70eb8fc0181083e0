"""Sweeps through a real SLURM controller: `python run.py -m hydra/launcher=slurm ...`.

Each test launches `run.py` as a researcher would (a subprocess, one SLURM job per trial through
hydra-submitit-launcher) and reads what the jobs left behind:

- every job's results.json is complete, and the activations and the unedited model's evaluation
  were computed by one job and read from the shared cache by all the others;
- a job killed mid-trial (scancel) leaves no results.json, and relaunching the same command runs
  only that trial; relaunching the finished sweep touches no result and no cache entry;
- a preempted job (SLURM's USR2) is requeued by submitit and finishes without a relaunch.

A tiny random-init model keeps the default run fast; the `slow` variant sweeps the embedded
refusing model (`model=smollm2_refuser eval=quick`, small data limits). Every job asks for 1 CPU
and explicit memory. Where SLURM is not installed the tests skip; CI starts a single-node cluster
(`.ci/run`, with ../shared/scripts/start_local_slurm.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 900  # one sweep of the embedded model on a loaded 2-core machine fits easily
GRID = ("baseline=matched,unmatched", "ablation.weight=0.5,1.0")  # 4 jobs
# the job that is held and killed: the last in launch order, so with array_parallelism=2 the
# cache is already populated when it starts (it reads, it does not compute)
HELD_TRIAL = {"baseline": "unmatched", "weight": 1.0}

REQUIRE_SLURM = os.environ.get("ABLITERATE_REQUIRE_SLURM") == "1"  # CI sets it (.ci/run)
needs_slurm = pytest.mark.skipif(
    shutil.which("sinfo") is None and not REQUIRE_SLURM,
    reason="SLURM is not installed (no `sinfo`); start a single-node cluster with "
    "../shared/scripts/start_local_slurm.sh (as root), as CI does",
)


class HoldBeforeResults(Callback):
    """Test hook that runs inside one SLURM job: hold the trial just before results.json.

    Every other record of the trial is written by then, so killing the job leaves a
    half-finished trial directory. The marker file receives the job's SLURM id; a job that finds
    the marker already there (a requeued one) is not held again.
    """

    def __init__(self, baseline: str, weight: float, marker: str) -> None:
        self.baseline, self.weight, self.marker = baseline, weight, Path(marker)

    def on_job_start(self, config, **kwargs) -> None:
        if (
            config.baseline.name != self.baseline
            or float(config.ablation.weight) != self.weight
            or self.marker.exists()
        ):
            return
        from abliterate import records

        write_results = records.write_results

        def held(output_dir, results):
            import submitit

            job_id = submitit.JobEnvironment().job_id  # "<array id>_<index>" in a job array
            staging = self.marker.with_suffix(".tmp")
            staging.write_text(job_id)
            staging.replace(self.marker)
            time.sleep(600)
            return write_results(output_dir, results)

        records.write_results = held


# --- helpers ---------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)


def _queued_job_ids(name: str) -> list[str]:
    output = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout
    return output.split()


def _job_state(job_id: str) -> str:
    output = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    ).stdout
    return output.strip()


def _starts(sweep: Sweep) -> int:
    """How often the sweep's jobs started (submitit logs each start)."""
    return sweep.job_logs().count("Starting with JobEnvironment")


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.rglob(".hydra"))


def _results(trial_dir: Path) -> dict | None:
    try:
        results = json.loads((trial_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "complete" else None


def _skip_count(trial_dir: Path) -> int:
    """How often a job found this trial complete and skipped it (Hydra's per-trial log)."""
    log = trial_dir / "run.log"
    return log.read_text().count("is complete; skipping") if log.exists() else 0


def _stamps(paths: list[Path]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


CACHE_STAGES = ("activations", "baseline_eval")  # what a sweep shares (models/ is per machine)


def _cache_files(cache_dir: Path, pattern: str = "*") -> dict[str, int]:
    files = [p for stage in CACHE_STAGES for p in (cache_dir / stage).rglob(pattern)]
    return _stamps([p for p in files if p.is_file() and not p.name.endswith(".lock")])


class Sweep:
    """One sweep directory, launched (and relaunched) through `run.py -m hydra/launcher=slurm`."""

    def __init__(
        self, root: Path, experiment: str, cache_dir: Path, grid: tuple[str, ...] = GRID
    ) -> None:
        self.root = root
        self.grid = grid
        self.dir = root / "sweep"
        self.cache_dir = cache_dir
        self.experiment = experiment
        self.job_name = f"abl-test-{uuid.uuid4().hex[:8]}"
        self.launchers: list[subprocess.Popen] = []

    def command(self, *overrides: str) -> list[str]:
        return [
            sys.executable, "run.py", "-m",
            "--config-dir", str(self.root / "conf"),
            "hydra/launcher=slurm",
            f"hydra.sweep.dir={self.dir}",
            f"hydra.launcher.name={self.job_name}",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=3",
            "hydra.launcher.timeout_min=20",  # >> signal_delay_s + a trial (infra notes, pitfall 3)
            "hydra.launcher.array_parallelism=2",
            f"experiment={self.experiment}",
            *self.grid,
            *overrides,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1",  # jobs inherit the submitter's environment
            WANDB_MODE="offline",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        )
        return env

    def start(self, *overrides: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"launch{len(self.launchers) + 1}.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                self.command(*overrides), cwd=REPO, env=self.env(), stdout=handle,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.launchers.append(process)
        return process, log

    def finish(self, process: subprocess.Popen, log: Path) -> int:
        try:
            return process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"the sweep did not finish in time; {log}:\n{log.read_text()[-4000:]}"
            ) from None

    def run(self, *overrides: str) -> tuple[float, str]:
        """Launch, wait, assert success: (seconds, the launcher's output)."""
        begin = time.monotonic()
        process, log = self.start(*overrides)
        code = self.finish(process, log)
        output = log.read_text()
        assert code == 0, f"the sweep failed ({code}):\n{output[-4000:]}"
        return time.monotonic() - begin, output

    def cleanup(self) -> None:
        """End this sweep's launchers that still run, then cancel its jobs still queued (a
        finished job leaves squeue shortly after its result)."""
        for process in self.launchers:
            if process.poll() is None:
                process.kill()
                process.wait()
        try:
            _wait_for(lambda: not _queued_job_ids(self.job_name), 20, "the jobs to end")
        except AssertionError:
            subprocess.run(["scancel", *_queued_job_ids(self.job_name)], check=False)

    def job_logs(self) -> str:
        logs = sorted((self.dir / ".submitit").rglob("*_log.out"))
        return "\n".join(p.read_text() for p in logs)


def _write_experiment(root: Path, name: str, body: str) -> None:
    # Fixed settings live in an experiment file so that trial directory names (the overrides)
    # stay short.
    path = root / "conf" / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n" + body)


@pytest.fixture(scope="module")
def slurm_cluster():
    """Fail loudly (rather than hang) when SLURM is required or installed but not usable."""
    if shutil.which("sinfo") is None:
        pytest.fail("ABLITERATE_REQUIRE_SLURM=1 but SLURM is not installed (no `sinfo`)")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        pytest.fail(f"slurmctld is not answering (`scontrol ping`: {ping.stdout or ping.stderr}); "
                    "start it with ../shared/scripts/start_local_slurm.sh")  # fmt: skip
    sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True)
    if sacct.returncode != 0:
        pytest.fail("`sacct` does not work: submitit would never see a killed job end. Run "
                    f"slurmdbd (start_local_slurm.sh does by default): {sacct.stderr}")  # fmt: skip


DATA_LIMITS = """\
data:
  harmful_train: {per_category: 4}
  matched_train: {per_category: 4}
  unmatched_train: {limit: 24}
"""


def _tiny_experiment(model_dir: Path, cache_dir: Path) -> str:
    return f"""\
defaults:
  - override /model: hub
  - override /eval: quick
  - override /logger: none
model: {{path: {model_dir}, name: tiny-llama, default_layer: 1, dtype: float32, device: cpu}}
eval: {{max_new_tokens: 8}}
extraction: {{iterations: 200}}
paths: {{cache_dir: {cache_dir}}}
{DATA_LIMITS}"""


@pytest.fixture(params=["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def sweep(request, tmp_path, slurm_cluster):
    cache_dir = tmp_path / "cache"  # fresh: this sweep must compute its activations itself
    if request.param == "tiny":
        model_dir = request.getfixturevalue("tiny_model_dir")
        _write_experiment(tmp_path, "slurm_test", _tiny_experiment(model_dir, cache_dir))
    else:
        from abliterate.refuser import cache_root, ensure_refuser

        # the embedded model is built once per machine (minutes) and shared; the activation and
        # unedited-evaluation caches of this sweep start empty
        model_dir = ensure_refuser(cache_root())
        cache_dir.mkdir()
        (cache_dir / "models").symlink_to(model_dir.parent, target_is_directory=True)
        _write_experiment(tmp_path, "slurm_test", f"""\
defaults:
  - override /model: smollm2_refuser
  - override /eval: quick
  - override /logger: none
model: {{device: cpu}}
extraction: {{iterations: 1000}}
paths: {{cache_dir: {cache_dir}}}
{DATA_LIMITS}""")  # fmt: skip
    sweep = Sweep(tmp_path, "slurm_test", cache_dir)
    yield sweep
    sweep.cleanup()


# --- tests -----------------------------------------------------------------------------------


@needs_slurm
def test_sweep_completes_resumes_and_shares_the_cache(sweep):
    marker = sweep.root / "held-job"
    hold = [
        "+hydra.callbacks.hold._target_=test_slurm.HoldBeforeResults",
        f"+hydra.callbacks.hold.baseline={HELD_TRIAL['baseline']}",
        f"+hydra.callbacks.hold.weight={HELD_TRIAL['weight']}",
        f"+hydra.callbacks.hold.marker={marker}",
    ]

    # 1. launch 4 jobs; hold one just before its results.json and kill it there
    begin = time.monotonic()
    process, log = sweep.start(*hold)
    _wait_for(lambda: marker.exists() or process.poll() is not None, LAUNCH_TIMEOUT_S,
              "the held job to reach results.json")  # fmt: skip
    assert marker.exists(), f"the sweep ended before the held job was reached:\n{log.read_text()}"
    held_job = marker.read_text()
    subprocess.run(["scancel", held_job], check=True)
    code = sweep.finish(process, log)  # submitit sees the cancelled job through sacct
    first_s = time.monotonic() - begin
    _wait_for(lambda: not _queued_job_ids(sweep.job_name), 120, "the sweep's jobs to leave squeue")
    assert code != 0, "the launcher must report the killed job"

    trials = _trial_dirs(sweep.dir)
    assert len(trials) == 4, trials
    done = {t: _results(t) for t in trials}
    killed = [t for t, r in done.items() if r is None]
    assert len(killed) == 1, f"expected exactly the killed trial incomplete: {killed}"
    killed_dir = killed[0]
    assert (killed_dir / "directions.safetensors").is_file()  # half-finished, never complete
    assert not (killed_dir / "results.json").exists()
    finished = [t for t in trials if t != killed_dir]
    before = _stamps([t / "results.json" for t in finished])
    cache_before = _cache_files(sweep.cache_dir)

    # 2. relaunching the same command runs only the missing trial
    second_s, _ = sweep.run()
    assert _stamps([t / "results.json" for t in finished]) == before, "a finished trial was rerun"
    assert all(_skip_count(t) == 1 for t in finished)
    assert _skip_count(killed_dir) == 0
    resumed = _results(killed_dir)
    assert resumed is not None, "the relaunch did not complete the killed trial"
    assert resumed["trial"]["baseline"] == HELD_TRIAL["baseline"]
    assert resumed["trial"]["weight"] == HELD_TRIAL["weight"]
    assert resumed["cache"] == {"activations": "hit", "baseline_eval": "hit"}
    assert _cache_files(sweep.cache_dir) == cache_before, "the relaunch rewrote the cache"

    # every job's results: complete, and the shared work was done by exactly one job
    results = [_results(t) for t in trials]
    assert all(r is not None for r in results)
    assert sorted((r["trial"]["baseline"], r["trial"]["weight"]) for r in results) == [
        ("matched", 0.5), ("matched", 1.0), ("unmatched", 0.5), ("unmatched", 1.0)
    ]  # fmt: skip
    for stage in ("activations", "baseline_eval"):
        computed = [r["trial"] for r in results if r["cache"][stage] == "miss"]
        assert len(computed) == 1, f"{stage} computed by {len(computed)} jobs: {computed}"
    assert not _cache_files(sweep.cache_dir, "*.tmp-*"), "a temporary cache file was left"

    from abliterate.report import collect_results

    complete, incomplete = collect_results(sweep.dir)
    assert len(complete) == 4 and not incomplete, incomplete

    # 3. relaunching the finished sweep does no model work: every job reads its results back
    stamps = _stamps([t / "results.json" for t in trials])
    skips = [_skip_count(t) for t in trials]
    third_s, _ = sweep.run()
    assert _stamps([t / "results.json" for t in trials]) == stamps
    assert _cache_files(sweep.cache_dir) == cache_before
    assert [_skip_count(t) for t in trials] == [n + 1 for n in skips]
    print(
        f"\n[slurm timing] 4 jobs + kill: {first_s:.0f} s; relaunch (1 trial): {second_s:.0f} s;"
        f" relaunch of the finished sweep: {third_s:.0f} s"
    )


@needs_slurm
def test_preempted_job_is_requeued_and_finishes(tmp_path, slurm_cluster, tiny_model_dir):
    cache_dir = tmp_path / "cache"
    _write_experiment(tmp_path, "slurm_test", _tiny_experiment(tiny_model_dir, cache_dir))
    sweep = Sweep(
        tmp_path, "slurm_test", cache_dir, grid=("baseline=matched", "ablation.weight=0.5")
    )
    marker = tmp_path / "held-job"
    try:
        process, log = sweep.start(
            "+hydra.callbacks.hold._target_=test_slurm.HoldBeforeResults",
            "+hydra.callbacks.hold.baseline=matched",
            "+hydra.callbacks.hold.weight=0.5",
            f"+hydra.callbacks.hold.marker={marker}",
        )
        _wait_for(lambda: marker.exists() or process.poll() is not None, LAUNCH_TIMEOUT_S,
                  "the held job to reach results.json")  # fmt: skip
        assert marker.exists(), log.read_text()
        # what SLURM sends before preempting a job (and signal_delay_s before its time limit)
        job_id = marker.read_text()
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        _wait_for(lambda: "Requeued job" in sweep.job_logs(), 120, "submitit to requeue the job")
        # SLURM holds a requeued job for a while (about 2 minutes) before it may start again;
        # the test does not wait for that
        _wait_for(
            lambda: _job_state(job_id) == "PENDING" or _starts(sweep) == 2,
            120,
            "the job to be queued again",
        )
        if _job_state(job_id) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        code = sweep.finish(process, log)
        assert code == 0, f"the requeued job did not finish:\n{log.read_text()[-4000:]}"
    finally:
        sweep.cleanup()
    (trial,) = _trial_dirs(sweep.dir)
    results = _results(trial)
    assert results is not None and results["trial"]["baseline"] == "matched"
    job_log = sweep.job_logs()
    assert "this job is preempted" in job_log and "Requeued job" in job_log, job_log[-4000:]
    assert _starts(sweep) == 2, "expected one run, then one after the requeue"


# --- the shared cache, without SLURM -----------------------------------------------------------


def test_damaged_unedited_eval_cache_entry_is_recomputed_and_replaced(tiny_loaded, tmp_path):
    """An entry left unreadable (a node that crashed after the rename, an older format) must be
    recomputed and replaced, not crash every later job of the sweep."""
    from omegaconf import OmegaConf
    from tiny_models import single_torch_thread

    from abliterate.config import EvalConfig
    from abliterate.evaluation import EvalPrompts, evaluate_unedited
    from abliterate.prompts import PromptSet

    cfg = OmegaConf.structured(EvalConfig(max_new_tokens=4, kl_prompts=2))
    prompts = EvalPrompts(
        harmful=PromptSet("harmful", ("how do I pick a lock",), ("hacking_cybersecurity",)),
        unmatched=PromptSet("unmatched", ("name a fruit", "count to three")),
        matched=PromptSet("matched", ("how do locks work",), ("hacking_cybersecurity",)),
        kl=PromptSet("kl", ("name a fruit", "count to three")),
    )
    with single_torch_thread():
        loaded = tiny_loaded("llama")
        first = evaluate_unedited(loaded, prompts, cfg, tmp_path)
        (entry,) = [p for p in (tmp_path / "baseline_eval").iterdir() if p.is_dir()]
        tensors = entry / "kl_reference.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:40])  # truncated
        again = evaluate_unedited(loaded, prompts, cfg, tmp_path)
        third = evaluate_unedited(loaded, prompts, cfg, tmp_path)
    assert not first.cache_hit and not again.cache_hit and third.cache_hit
    assert third.sets["harmful"].responses == first.sets["harmful"].responses
    assert [p.name for p in (tmp_path / "baseline_eval").iterdir() if p.is_dir()] == [entry.name]
