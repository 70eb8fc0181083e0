"""Heretic (PyPI ``heretic-llm``) on the benchmark's model and prompts, in its own environment.

Heretic is installed from PyPI into ``benchmarks/.heretic-venv`` (pinned, with this environment's
torch version so pip takes the same CPU build) and configured through a ``config.toml`` in its
working directory: the local model directory, the benchmark's prompts as plain-text files (one
prompt per line, which Heretic reads without ``datasets`` or the hub), the same response length,
batch size and dtype. It runs a short Optuna study; the time of a trial is read off its output, as
the time between consecutive "Running trial" lines (the last one ends at "Optimization
finished!"), i.e. everything a trial costs it: sampling, LoRA reset, abliteration, first-token KL
and the refusal count. After the study it waits for a menu choice; the benchmark ends it there.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from peak_memory import PeakRss

HERETIC_VERSION = "1.4.0"
BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR / ".heretic-venv"
EXECUTABLE = VENV / "bin" / "heretic"

_TRIAL = re.compile(r"Running trial (\d+) of (\d+)")
_FINISHED = "Optimization finished"
_RSS = re.compile(r"Resident system RAM: ([\d.]+) GB")


def ensure_heretic(log_path: Path) -> Path:
    """Install the pinned Heretic into its own venv unless it is there already."""
    marker = VENV / f".installed-{HERETIC_VERSION}"
    if EXECUTABLE.exists() and marker.exists():
        return EXECUTABLE
    base_python = getattr(sys, "_base_executable", sys.executable)
    torch_version = torch.__version__.split("+")[0]
    with log_path.open("a") as log:
        subprocess.run([base_python, "-m", "venv", str(VENV)], check=True, stdout=log, stderr=log)
        # one resolver run, torch pinned: pip keeps this machine's build (CPU here) instead of
        # pulling a multi-GB CUDA one
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "--quiet", f"torch=={torch_version}",
             f"heretic-llm=={HERETIC_VERSION}"],
            check=True, stdout=log, stderr=log,
        )  # fmt: skip
    marker.touch()
    return EXECUTABLE


def _write_prompts(path: Path, prompts: list[str]) -> str:
    for prompt in prompts:
        if "\n" in prompt or not prompt.strip():
            raise ValueError(f"a Heretic prompt file holds one prompt per line: {prompt!r}")
    path.write_text("".join(f"{prompt}\n" for prompt in prompts), encoding="utf-8")
    return str(path)


def _toml_value(value: object) -> str:
    # JSON strings, numbers, booleans and lists of them are valid TOML values
    return json.dumps(value)


def write_config(
    directory: Path,
    model_dir: Path,
    prompts: dict[str, list[str]],
    max_new_tokens: int,
    batch_size: int,
    n_trials: int,
    device: str,
    seed: int = 0,
) -> Path:
    """Heretic's ``config.toml`` for equal work with the benchmark's evaluation.

    Args:
        prompts: ``good`` / ``bad`` (direction extraction: generic harmless and harmful train
            prompts), ``good_evaluation`` (the KL prompts), ``bad_evaluation`` (the harmful
            evaluation prompts).
    """
    settings = {
        "model": str(model_dir),
        "dtypes": ["float32"],
        "device_map": device,
        "batch_size": batch_size,  # ours: Heretic's own search would only lengthen its start-up
        "max_response_length": max_new_tokens,
        "response_prefix": "",  # no prefix search (and no prefix appended to prompts)
        # the embedded model is used without a system turn; Heretic always renders one, so it
        # gets an empty one (4 template tokens more per prompt)
        "system_prompt": "",
        "n_trials": n_trials,
        "n_startup_trials": n_trials,  # all random: no TPE fitting between trials
        "seed": seed,
        "study_checkpoint_dir": str(directory / "checkpoints"),
    }
    lines = [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    for name, rows in prompts.items():
        file = _write_prompts(directory / f"{name}.txt", rows)
        lines += ["", f"[{name}_prompts]", f"dataset = {_toml_value(file)}"]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_heretic(directory: Path, timeout_s: float) -> dict:
    """Run Heretic in ``directory`` (holding its config.toml) and time its trials.

    Returns:
        ``trial_s`` (seconds per trial, in order), ``median_trial_s``, ``setup_s`` (start to
        the first trial), ``total_s``, ``peak_rss_gb`` (the process's maximum resident set),
        ``log``.
    """
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="200",  # Rich wraps at the terminal width; a pipe has none
        NO_COLOR="1",
        TERM="dumb",
    )
    log_path = directory / "heretic.log"
    starts: list[float] = []
    finished = None
    reported_rss: list[float] = []
    begin = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(EXECUTABLE)], cwd=directory, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        assert process.stdout is not None
        watchdog = threading.Timer(timeout_s, process.kill)  # a silent hang ends too
        watchdog.start()
        try:
            with PeakRss(process.pid) as peak:
                for line in process.stdout:
                    now = time.perf_counter()
                    log.write(line)
                    if _TRIAL.search(line):
                        starts.append(now)
                    elif match := _RSS.search(line):
                        reported_rss.append(float(match.group(1)))
                    elif _FINISHED in line:
                        finished = now
                        break
        finally:
            watchdog.cancel()
            process.terminate()  # it waits at its result menu
            process.wait()
    if finished is None or not starts:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(
            f"Heretic did not finish its trials (in {timeout_s:.0f} s); its output ends with:\n{tail}"
        )
    ends = [*starts[1:], finished]
    trial_s = [end - start for start, end in zip(starts, ends, strict=True)]
    return {
        "version": HERETIC_VERSION,
        "trial_s": trial_s,
        "median_trial_s": statistics.median(trial_s),
        "setup_s": starts[0] - begin,
        "total_s": finished - begin,
        "peak_rss_gb": peak.gb,
        "reported_rss_gb": max(reported_rss, default=None),
        "log": str(log_path),
    }
