"""W&B tracking of a trial: what an offline run records, read back from its run directory and
checked against results.json; and W&B broken on purpose never costs a result or leaves a process.

Nothing here touches the network: online mode is only ever pointed at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from hydra import compose, initialize_config_dir

from abliterate import tracking
from abliterate.config import ConfigError, register_configs
from abliterate.pipeline import main

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tiny_models import single_torch_thread

    with single_torch_thread():
        yield


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """No W&B credentials, host or directories from the environment; $HOME is an empty folder so
    that anything W&B would write there shows up."""
    for variable in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR",
                     "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ENTITY", "WANDB_PROJECT"):  # fmt: skip
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    yield home
    assert not wandb_children(), "a W&B helper process outlived the trial"
    written = [p for p in home.rglob("*") if "wandb" in p.name.lower()]
    assert not written, f"W&B wrote into $HOME: {written}"


def wandb_children() -> list[str]:
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("wandb"):
                names.append(f"{child.pid}:{child.name()}")
        except psutil.Error:
            continue
    return names


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # activations and baseline evaluation, shared


def compose_trial(tiny_model_dir: Path, cache_dir: Path, output_dir: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=hub",
                f"model.path={tiny_model_dir}",
                "model.name=tiny-llama",
                "model.default_layer=1",
                "model.dtype=float32",
                "model.device=cpu",
                "eval=quick",
                "eval.max_new_tokens=8",
                "extraction.iterations=200",
                "data.harmful_train.per_category=4",
                "data.matched_train.per_category=4",
                "data.unmatched_train.limit=24",
                f"paths.cache_dir={cache_dir}",
                f"paths.output_dir={output_dir}",
                *overrides,
            ],
        )


def wandb_cli(*args: str) -> str:
    executable = Path(sys.executable).with_name("wandb")
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "wandb"]
    done = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def inspect_summary(run_dir: Path) -> dict:
    """Config, summary, state and exit code of a run, from its .wandb log."""
    return json.loads(wandb_cli("leet", "inspect", "--summary", "--json", str(run_dir)))


def inspect_records(run_dir: Path) -> list[dict]:
    """Every record of a run's .wandb log."""
    output = wandb_cli("leet", "inspect", "--json", str(run_dir))
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def run_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("*run-*"))


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def job_log(path: Path):
    """What Hydra's job logging does: the root logger also writes into <trial>/run.log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def history_keys(run_dir: Path) -> set[str]:
    """Every key logged with a step (``run.log``), as opposed to written to the summary."""
    keys: set[str] = set()
    for record in inspect_records(run_dir):
        if record["type"] == "history":
            keys |= set(record["history"]["item"])
    return keys


def test_offline_run_records_the_trial(tiny_model_dir, cache_dir, tmp_path, wandb_env, capfd):
    out = tmp_path / "out"
    cfg = compose_trial(
        tiny_model_dir, cache_dir, out, "logger=wandb", "baseline=matched", "ablation.weight=0.8",
        "logger.tags=[test,tiny]",
    )  # fmt: skip
    with job_log(out / "run.log"):
        main(cfg)
    assert "wandb:" not in capfd.readouterr().err  # W&B's own console output is off
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete"
    (run_dir,) = run_dirs(out)
    assert run_dir.name.startswith("offline-run-")
    assert run_dir.name.endswith(tracking.run_id(out))  # the id is the trial directory's
    # W&B's staging, cache and logs stay in the trial directory
    assert list((out / "wandb" / "data").rglob("*")), "artifact staging is not in the trial dir"
    assert os.environ.get("WANDB_DATA_DIR") is None, "the trial's W&B directories leaked"

    summary = inspect_summary(run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["project"] == "abliterate" and summary["name"] == out.name
    assert summary["run_id"] == tracking.run_id(out)
    assert sorted(summary["tags"]) == sorted(
        ["test", "tiny", "model:tiny-llama", "baseline:matched", "extraction:som_per_class",
         "combine:merged", f"judge:{results['trial']['judge']}"]
    )  # fmt: skip
    config = summary["config"]
    assert config["baseline"]["name"] == "matched" and config["ablation"]["weight"] == 0.8
    assert config["trial"] == results["trial"]  # layer, weight, baseline ... as config columns

    metrics = summary["summary"]
    expected = tracking.trial_metrics(results)
    assert {"eval/refusal_rate", "eval/kl_divergence", "geometry/capture",
            "geometry/norm_ratio_matched_to_unmatched", "timing/total",
            "baseline/refusal_rate", "eval/outcomes/COMPLY"} <= set(expected)  # fmt: skip
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for category, rate in results["eval"]["refusal_rate_by_category"].items():
        assert metrics[f"eval/refusal_rate_by_category/{category}"] == pytest.approx(rate)
    # the metrics are written once, to the summary: none of them is a one-point line chart
    logged = history_keys(run_dir)
    assert not logged & set(expected), logged & set(expected)

    files = run_dir / "files"
    table = json.loads((files / metrics[tracking.CATEGORY_TABLE]["path"]).read_text())
    assert table["columns"] == tracking.CATEGORY_COLUMNS
    by_category = {row[0]: row for row in table["data"]}
    assert set(by_category) == set(results["eval"]["refusal_rate_by_category"])
    for category, rate in results["eval"]["refusal_rate_by_category"].items():
        assert by_category[category][2] == pytest.approx(rate)
    assert sum(row[1] for row in table["data"]) == results["eval"]["n_harmful"]

    # every completion, not a sample
    completions = [
        json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()
    ]
    table = json.loads((files / metrics[tracking.COMPLETIONS_TABLE]["path"]).read_text())
    assert table["columns"] == tracking.COMPLETION_COLUMNS
    assert len(table["data"]) == len(completions)
    column = {name: i for i, name in enumerate(table["columns"])}
    logged_rows = {(row[column["set"]], row[column["index"]], row[column["prompt"]],
                    row[column["response"]], row[column["label"]]) for row in table["data"]}  # fmt: skip
    assert logged_rows == {(row["set"], row["index"], row["prompt"], row["response"],
                            row["label"]) for row in completions}  # fmt: skip

    for key in ("figures/direction_cosines", "figures/geometry", "figures/outcomes_by_category"):
        image = metrics[key]
        assert image["_type"] == "image-file"
        assert (files / image["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("direction_cosines.png", "geometry.png", "outcomes_by_category.png"):
        assert (out / "plots" / name).is_file()

    # the trial's log file, as it was when the run ended
    saved = (files / "run.log").read_text()
    assert "abliterate" in saved and (out / "run.log").read_text().startswith(saved)

    records = inspect_records(run_dir)
    run_record = [r["run"] for r in records if r["type"] == "run"][0]  # later ones: tag updates
    assert run_record["run_group"] == str(out)  # no Hydra here: the trial directory
    assert run_record["job_type"] == "trial" and run_record["resume"]
    assert any(r["type"] == "files" and r["files"]["files"][0]["path"] == "run.log"
               for r in records)  # fmt: skip
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    (directions,) = [a for a in artifacts if a["type"] == "directions"]
    assert directions["name"] == tracking.artifact_name(results)
    assert directions["name"] == "directions-tiny-llama-matched-som_per_class-L1"
    (entry,) = directions["manifest"]["contents"]
    assert entry["path"] == "directions.safetensors"
    md5 = hashlib.md5((out / "directions.safetensors").read_bytes()).digest()
    assert entry["digest"] == base64.b64encode(md5).decode()
    assert Path(entry["local_path"]).read_bytes() == (out / "directions.safetensors").read_bytes()
    assert json.loads(directions["metadata"])["layer"] == results["trial"]["layer"]


def test_a_forced_rerun_updates_one_run(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "out"
    main(compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb"))
    (first,) = run_dirs(out)
    main(compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb", "force=true"))
    (second,) = run_dirs(out)  # one run directory: the rerun's
    assert first != second and not first.exists()
    (superseded,) = (out / "wandb" / tracking.SUPERSEDED_DIR).iterdir()
    assert superseded.name == first.name  # kept beside it, as results.json.superseded
    ids = {inspect_summary(d)["run_id"] for d in (second, superseded)}
    assert ids == {tracking.run_id(out)}  # one W&B run: `wandb sync` of either updates it
    assert inspect_summary(second)["state"] == "finished"


def test_wandb_environment_variables_win_over_the_config(
    tiny_model_dir, cache_dir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb", "logger.mode=offline"))
    assert (out / "results.json").is_file() and not (out / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_TAGS", "env-tag")
    settings = tracking.LoggerSettings.from_config(
        compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb_online").logger
    )
    assert (settings.mode, settings.project) == ("offline", "from-env")
    assert settings.tags == ["env-tag"]


def test_sync_logs_a_trial_that_ran_without_wandb(tiny_model_dir, cache_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    out = sweep / "0_trial"
    with job_log(out / "run.log"):
        main(compose_trial(tiny_model_dir, cache_dir, out, "logger=none"))
    assert not (out / "wandb").exists()
    results = json.loads((out / "results.json").read_text())
    assert tracking.main(["sync", str(sweep), "--mode", "offline"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 1 trial(s) logged" in printed and "wandb sync" in printed
    (run_dir,) = run_dirs(out)
    summary = inspect_summary(run_dir)
    assert summary["run_id"] == tracking.run_id(out) and summary["state"] == "finished"
    assert summary["summary"]["eval/refusal_rate"] == pytest.approx(results["eval"]["refusal_rate"])
    assert "baseline:unmatched" in summary["tags"]
    assert summary["config"]["trial"] == results["trial"]
    run = [r["run"] for r in inspect_records(run_dir) if r["type"] == "run"][0]
    assert run["run_group"] == str(sweep.resolve())  # the sweep, as a multirun trial's group
    completions = (out / "completions.jsonl").read_text().splitlines()
    table = summary["summary"][tracking.COMPLETIONS_TABLE]
    assert table["nrows"] == len(completions)
    assert (run_dir / "files" / "run.log").read_text() == (out / "run.log").read_text()
    # a second sync finds the run and leaves the trial alone
    assert tracking.main(["sync", str(sweep)]) == 0
    assert "skipped (has a W&B run" in capsys.readouterr().out
    assert len(run_dirs(out)) == 1


def test_broken_wandb_falls_back_offline_and_keeps_every_record(
    tiny_model_dir, cache_dir, tmp_path, monkeypatch, caplog
):
    port = closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # fake
    out = tmp_path / "out"
    cfg = compose_trial(
        tiny_model_dir, cache_dir, out, "logger=wandb", "logger.mode=online",
        "logger.init_timeout_s=3",
    )  # fmt: skip
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="abliterate.tracking"):
        main(cfg)
    elapsed = time.perf_counter() - start
    # wandb's defaults would hang ~100 s; here: identity lookup (~10 s) + 3 s init + the trial
    assert elapsed < 60, elapsed
    for name in ("results.json", "completions.jsonl", "directions.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    warnings = [r.getMessage() for r in caplog.records if r.name == "abliterate.tracking"]
    assert len(warnings) == 1, warnings
    assert "online init failed" in warnings[0] and "offline" in warnings[0]
    assert f"127.0.0.1:{port}" in warnings[0]  # says what failed
    offline = [d for d in run_dirs(out) if d.name.startswith("offline-run-")]
    assert len(offline) == 1
    summary = inspect_summary(offline[0])
    assert summary["state"] == "finished"
    assert "eval/refusal_rate" in summary["summary"]


def test_wandb_that_cannot_start_at_all_means_no_tracking(
    tiny_model_dir, cache_dir, tmp_path, monkeypatch, caplog
):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("service crashed\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    out = tmp_path / "out"
    cfg = compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb")
    with caplog.at_level(logging.WARNING, logger="abliterate.tracking"):
        main(cfg)
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    warnings = [r.getMessage() for r in caplog.records if r.name == "abliterate.tracking"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "offline init failed (RuntimeError: service crashed)" in warnings[0]
    assert "no tracking" in warnings[0]


def test_failure_while_logging_warns_once_and_finishes(
    tiny_model_dir, cache_dir, tmp_path, monkeypatch, caplog
):
    def broken(self, *args):
        raise OSError("W&B service went away")

    monkeypatch.setattr(tracking.WandbTracker, "_log_metrics", broken)
    out = tmp_path / "out"
    cfg = compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb")
    with caplog.at_level(logging.WARNING, logger="abliterate.tracking"):
        main(cfg)
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    warnings = [r.getMessage() for r in caplog.records if r.name == "abliterate.tracking"]
    assert len(warnings) == 1 and "logging (metrics) failed" in warnings[0], warnings
    summary = inspect_summary(run_dirs(out)[0])
    assert summary["state"] == "finished" and "trial" in summary["config"]
    assert "eval/refusal_rate" not in summary["summary"]  # the rest was skipped


def test_a_failing_trial_ends_its_run_as_failed(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "out"
    cfg = compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb", "layer=7")
    with pytest.raises(ConfigError, match="layer=7"):
        main(cfg)
    assert not wandb_children()
    (run_dir,) = run_dirs(out)
    assert inspect_summary(run_dir)["exit_code"] == 1


def test_logger_none_and_complete_trials_start_no_run(tiny_model_dir, cache_dir, tmp_path):
    out = tmp_path / "out"
    main(compose_trial(tiny_model_dir, cache_dir, out, "logger=none"))
    assert (out / "results.json").is_file() and not (out / "wandb").exists()
    # a complete trial is read back, not rerun, and not logged again
    main(compose_trial(tiny_model_dir, cache_dir, out, "logger=wandb"))
    assert not (out / "wandb").exists()


def test_wandb_is_the_default_logger_and_offline(tiny_model_dir, cache_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, cache_dir, tmp_path / "out")
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"


def test_metrics_are_namespaced_scalars_without_nan():
    results = {
        "eval": {"refusal_rate": 0.5, "kl_divergence": float("nan"), "kl_top_k": None,
                 "refusal_rate_by_category": {"harassment": 0.25}},
        "geometry": {"capture": 0.7, "direction_cosines": [[1.0]], "per_category": {}},
        "timing_s": {"total": 3.0},
        "baseline_eval": {"refusal_rate": 1.0},
        "directions": {"count": 3, "norms": [1.0], "degenerate": 0},
        "cache": {"activations": "hit"},
        "trial": {"norm_preserving": False},
    }  # fmt: skip
    assert tracking.trial_metrics(results) == {
        "eval/refusal_rate": 0.5,
        "eval/refusal_rate_by_category/harassment": 0.25,
        "geometry/capture": 0.7,
        "timing/total": 3.0,
        "baseline/refusal_rate": 1.0,
        "directions/count": 3,
        "directions/degenerate": 0,
    }
    assert not any(
        isinstance(v, float) and math.isnan(v) for v in tracking.trial_metrics(results).values()
    )


def test_artifact_names_are_valid():
    trial = {"model": "org/My Model", "baseline": "unmatched", "extraction": "som_global",
             "orthogonalize": "svd", "layer": 12}  # fmt: skip
    assert (
        tracking.artifact_name({"trial": trial})
        == "directions-My_Model-unmatched-som_global-svd-L12"
    )


def test_has_run_in_a_shared_wandb_dir_is_the_trials_own_run(tmp_path, monkeypatch):
    """With $WANDB_DIR set every trial's run lands in one folder: another trial's run there is not
    this trial's (sync used to skip every trial but the first as 'has a W&B run')."""
    first, second = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    for trial in (first, second):
        trial.mkdir(parents=True)
    assert not tracking.has_run(first)
    (first / "wandb" / f"offline-run-20261206_101010-{tracking.run_id(first)}").mkdir(parents=True)
    assert tracking.has_run(first) and not tracking.has_run(second)
    (second / "wandb" / "offline-run-20261206_101010-abc123").mkdir(parents=True)
    assert tracking.has_run(second)  # in its own folder, a run of any id (an older trial's)
    shared = tmp_path / "shared"
    monkeypatch.setenv("WANDB_DIR", str(shared))
    (shared / "wandb" / f"offline-run-20261206_101010-{tracking.run_id(first)}").mkdir(parents=True)
    assert tracking.has_run(first)
    assert not tracking.has_run(second)


def test_sync_mode_flag_wins_over_wandb_mode(tmp_path, monkeypatch, capsys):
    """`WANDB_MODE=disabled ... sync DIR` says "pass --mode offline"; with it the trials are
    logged (the environment used to win over the flag: every trial 'not logged', exit 1)."""
    from test_report import fake_results_v2, outcomes, write_trial

    sweep = tmp_path / "sweep"
    trial = write_trial(sweep, "0_trial", fake_results_v2("matched", 1, 1.0, outcomes(1, 0, 3, 0)))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.main(["sync", str(sweep)]) == 1
    assert "pass --mode offline" in capsys.readouterr().out
    assert tracking.main(["sync", str(sweep), "--mode", "offline"]) == 0
    assert "1 of 1 trial(s) logged" in capsys.readouterr().out
    assert len(list((trial / "wandb").glob("offline-run-*"))) == 1
    assert os.environ["WANDB_MODE"] == "disabled"  # the process's environment is restored
