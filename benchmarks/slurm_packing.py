"""One sweep, three launchers: in-process, SLURM one trial per job, SLURM k trials per job.

    python benchmarks/slurm_packing.py                 # the embedded model, 8 trials (minutes)
    python benchmarks/slurm_packing.py --model-dir DIR --layers 0,1,2,-1 --quick  # a smoke run

The same 8-trial sweep (``baseline=matched,unmatched`` x 4 layers, the embedded model,
``eval=quick``, ``logger=none``) is launched three times with ``run.py -m``, each into a fresh
sweep directory over one shared, warm cache (activations and the unedited model's evaluation
computed by an untimed warm-up trial first), so every launch runs all 8 trials:

- ``in_process``: ``hydra/launcher=basic``, one process, the model loaded once;
- ``slurm_per_trial``: ``hydra/launcher=slurm``, one job per trial (``trials_per_job=1``);
- ``slurm_packed``: ``hydra/launcher=slurm hydra.launcher.trials_per_job=4
  'hydra.launcher.group_by=[baseline]'``: 2 jobs, each one baseline's 4 layers.

Each time is the launching command's wall time, start to exit (Python start, composition,
submission, SLURM scheduling, submitit's polling, the trials). SLURM jobs ask for every core of
this machine (``cpus_per_task`` = its CPU count), so they run one at a time with the threads the
in-process sweep has: the differences are what a job costs, not parallelism. The three launches
run ``--repeats`` rounds (default 2), interleaved, so a slow spell of the machine falls on all
three; one launch's wall time varies from round to round by about the margin the targets are
judged at. Prints each round's
ratios and the ratios of the median wall times, ``packed / in_process`` (target <= 1.3) and
``packed / per_trial`` (target <= 0.7), and writes
``benchmarks/slurm_packing.json`` (or ``--output``), with the per-trial stage times from each
trial's results.json and the load average before and after each launch (other work on the
machine slows some launches more than others). Needs a running SLURM (``sinfo``) with ``sacct``
(../shared/scripts/start_local_slurm.sh). Nothing here is run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TARGETS = {"packed_vs_in_process": 1.3, "packed_vs_per_trial": 0.7}  # at most, as issue 18 sets


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _experiment(conf_dir: Path, cache_dir: Path, model_dir: Path | None, quick: bool) -> None:
    model = "  - override /model: hub\n" if model_dir is not None else ""
    body = (
        "# @package _global_\ndefaults:\n"
        + model
        + ("  - override /eval: quick\n  - override /logger: none\n")
    )
    if model_dir is not None:
        body += (
            f"model: {{path: {model_dir}, name: tiny, default_layer: 1, dtype: float32, "
            "device: cpu}\n"
        )
    else:
        body += "model: {device: cpu}\n"
    if quick:
        body += "eval: {max_new_tokens: 8}\nextraction: {iterations: 200}\n"
    body += f"paths: {{cache_dir: {cache_dir}}}\n"
    path = conf_dir / "experiment" / "bench_packing.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def _trial_timings(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for results_file in sorted(sweep_dir.rglob("results.json")):
        results = json.loads(results_file.read_text())
        if results.get("status") != "complete":
            continue
        rows.append(
            {
                "trial": results_file.parent.name,
                "cache": results["cache"],
                "timing_s": {k: round(v, 3) for k, v in results["timing_s"].items()},
            }
        )
    return rows


def _launch(
    name: str, overrides: list[str], conf_dir: Path, work: Path, env: dict[str, str]
) -> dict[str, Any]:
    sweep_dir = work / name
    log = work / f"{name}.log"
    command = [
        sys.executable, "run.py", "-m", "--config-dir", str(conf_dir),
        "experiment=bench_packing", f"hydra.sweep.dir={sweep_dir}", *overrides,
    ]  # fmt: skip
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    load_before = _load()
    begin = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - begin
    if code.returncode != 0:
        raise SystemExit(f"{name} failed ({code.returncode}); its output: {log}")
    trials = _trial_timings(sweep_dir)
    print(f"[{name}] {wall:.1f} s, {len(trials)} trials complete", flush=True)
    loads = sum(1 for t in trials if t["timing_s"].get("load", 0.0) > 0.5)
    return {
        "wall_s": round(wall, 2),
        "trials": trials,
        "trial_total_s": round(sum(t["timing_s"]["total"] for t in trials), 2),
        "trials_with_model_load": loads,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "overrides": overrides,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="16,18,20,22", help="4 layers (the grid's axis)")
    parser.add_argument("--trials-per-job", type=int, default=4)
    parser.add_argument("--model-dir", type=Path, help="a local hub-format model instead of the "
                        "embedded one (a smoke run on a tiny model)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 200 SOM iterations")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "slurm_packing.json")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three launches, "
                        "interleaved; the ratios are of the median wall times")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the sweeps (printed path)")
    args = parser.parse_args()
    if shutil.which("sinfo") is None:
        raise SystemExit("error: SLURM is not running here (no `sinfo`)")

    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="slurm-packing-"))
    conf_dir, cache_dir = work / "conf", work / "cache"
    cache_dir.mkdir()
    if args.model_dir is None:
        from abliterate.refuser import cache_root, ensure_refuser

        # the embedded model is shared with the machine's cache (built once); activations and
        # the unedited evaluation start empty here and are warmed below
        model_dir = ensure_refuser(cache_root())
        (cache_dir / "models").symlink_to(model_dir.parent, target_is_directory=True)
    _experiment(conf_dir, cache_dir, args.model_dir, args.quick)
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)  # every launcher gets every core (SLURM jobs: cpus_per_task)
    grid = ["baseline=matched,unmatched", f"layer={args.layers}"]
    slurm = [
        "hydra/launcher=slurm",
        f"hydra.launcher.name=abl-bench-{uuid.uuid4().hex[:6]}",
        f"hydra.launcher.cpus_per_task={cpus}",
        "hydra.launcher.mem_gb=4",
        "hydra.launcher.timeout_min=30",
    ]

    # untimed warm-up: the activations and the unedited model's evaluation into the cache
    warm = _launch("warm_up", [f"layer={args.layers.split(',')[0]}"], conf_dir, work, env)
    launches = {
        "in_process": grid,
        "slurm_per_trial": [*slurm, *grid],
        "slurm_packed": [
            *slurm,
            f"hydra.launcher.trials_per_job={args.trials_per_job}",
            "hydra.launcher.group_by=[baseline]",
            *grid,
        ],
    }
    # the three launches interleaved, `repeats` rounds: a slow spell of the machine falls on
    # every launcher alike, and the spread between rounds says how far one launch's time goes
    repetitions: list[dict[str, Any]] = []
    for round_number in range(1, args.repeats + 1):
        runs = {
            name: _launch(f"{name}_{round_number}", overrides, conf_dir, work, env)
            for name, overrides in launches.items()
        }
        for name, run in runs.items():
            misses = [t["trial"] for t in run["trials"] if "miss" in t["cache"].values()]
            if len(run["trials"]) != 8 or misses:
                raise SystemExit(
                    f"error: {name}: {len(run['trials'])} trials, cold caches {misses}"
                )
        repetitions.append(runs)
    walls = {name: [r[name]["wall_s"] for r in repetitions] for name in launches}
    median = {name: statistics.median(values) for name, values in walls.items()}
    ratios = {
        "packed_vs_in_process": round(median["slurm_packed"] / median["in_process"], 3),
        "packed_vs_per_trial": round(median["slurm_packed"] / median["slurm_per_trial"], 3),
    }
    by_round = [
        {
            "packed_vs_in_process": round(
                r["slurm_packed"]["wall_s"] / r["in_process"]["wall_s"], 3
            ),
            "packed_vs_per_trial": round(
                r["slurm_packed"]["wall_s"] / r["slurm_per_trial"]["wall_s"], 3
            ),
        }
        for r in repetitions
    ]
    from abliterate import provenance

    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "code_version": provenance.code_version(),
        "machine": {
            "platform": platform.platform(),
            "cpus": cpus,
            "python": platform.python_version(),
        },
        "model": str(args.model_dir) if args.model_dir else "embedded (smollm2_refuser)",
        "grid": grid,
        "trials_per_job": args.trials_per_job,
        "warm_up": warm,
        "repeats": args.repeats,
        "wall_s": walls,
        "median_wall_s": median,
        "repetitions": repetitions,
        "ratios": ratios,  # of the median wall times
        "ratios_by_repetition": by_round,
        "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
        "met": {k: ratios[k] <= v for k, v in TARGETS.items()},
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print()
    for number, runs in enumerate(repetitions, start=1):
        for name, run in runs.items():
            print(
                f"round {number}  {name:16s} {run['wall_s']:7.1f} s wall   trials' own time "
                f"{run['trial_total_s']:6.1f} s   model loads {run['trials_with_model_load']}   "
                f"load avg {run['load_average_before'][0]} -> {run['load_average_after'][0]}"
            )
    for number, round_ratios in enumerate(by_round, start=1):
        print(f"round {number}  " + "   ".join(f"{k} {v:.3f}" for k, v in round_ratios.items()))
    print("median wall times: " + ", ".join(f"{k} {v:.1f} s" for k, v in median.items()))
    for key, value in ratios.items():
        verdict = "met" if record["met"][key] else "MISSED"
        print(f"{key:22s} {value:.3f}  (medians; target <= {TARGETS[key]}: {verdict})")
    print(f"written: {args.output}")
    if args.keep:
        print(f"sweeps kept under {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
