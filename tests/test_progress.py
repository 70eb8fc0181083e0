"""A sweep says where it stands: "trial i of n" with elapsed and remaining time, per stage lines."""

from __future__ import annotations

import subprocess

from test_reliability import REPO, cli_command, cli_env

from abliterate.progress import format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_multirun_logs_trial_i_of_n_with_remaining_time_and_stage_lines(tiny_model_dir, tmp_path):
    command = cli_command(
        tiny_model_dir, tmp_path, "logger=none", "baseline=matched,unmatched", "seed=0,1"
    )
    command = [c for c in command if not c.startswith("hydra.run.dir=")]
    command[2:2] = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(
        command, cwd=REPO, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for i in range(1, 5):
        assert f"trial {i} of 4 (" in output, output[-3000:]
    # from the second trial on, the estimate of what is left
    assert "trial 2 of 4 (baseline=matched seed=1): " in output
    assert "remaining" in output.split("trial 4 of 4")[1].splitlines()[0]
    assert "sweep: 4 trials in " in done.stdout
    # one line per stage, cache hit or miss, into each trial's own log file
    logs = sorted((tmp_path / "sweep").glob("*/*.log"))
    assert len(logs) == 4, logs
    first = logs[0].read_text()
    assert "trial " in first and " of 4 (" in first
    assert "activations: " in first and "(cache " in first
    assert "baseline_evaluation: " in first
    assert "summary of " in first and "harmful" in first.split("summary of ")[1]


def test_sweep_size_counts_config_params_and_the_command_line():
    from omegaconf import OmegaConf

    from abliterate.progress import sweep_size

    def config(params, task):
        return OmegaConf.create(
            {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                   "params": params}, "overrides": {"task": task}}}
        )  # fmt: skip

    assert sweep_size(config(None, ["baseline=matched,unmatched", "layer=range(8,12)"])) == 8
    assert sweep_size(config({"seed": "0,1,2"}, ["baseline=matched,unmatched"])) == 6
    # the command line's value wins over the config's for the same key
    assert sweep_size(config({"seed": "0,1,2"}, ["seed=5"])) == 1
    optuna = OmegaConf.create({"hydra": {"sweeper": {"_target_": "x.OptunaSweeper", "n_trials": 20},
                                         "overrides": {"task": []}}})  # fmt: skip
    assert sweep_size(optuna) == 20
