"""Every config group option and every experiment file composes, and typos fail at compose time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from abliterate.config import (
    DIRNAME_MAX_BYTES,
    ConfigError,
    choice_error_line,
    choice_fields,
    register_configs,
    safe_dirname,
    validate_config,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "data", "baseline", "extraction", "ablation", "eval", "logger", "paths")


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/unused", *overrides])


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    extra = []
    if group == "model" and option in ("hub", "gguf"):
        extra = ["model.path=x", "model.name=x", "model.default_layer=3"]
    cfg = _compose(f"{group}={option}", *extra)
    OmegaConf.to_container(cfg, resolve=True)
    validate_config(cfg)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose(f"experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True)
    validate_config(cfg)


def test_reference_experiment_is_the_papers_setup():
    cfg = _compose("experiment=petrov_qwen3_5_2b")
    assert cfg.model.path == "Qwen/Qwen3.5-2B" and cfg.model.num_layers == 24
    assert cfg.extraction.method == "som_per_class" and cfg.extraction.som_rows == 3
    assert cfg.eval.kl_tokens == 50 and cfg.eval.kl_prompts == 100 and cfg.eval.kl_top_k == 100
    assert len(cfg.data.categories) == 9


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        _compose("ablation.wieght=0.5")


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        _compose("ablation.weight=heavy")


@pytest.mark.parametrize("key", sorted(choice_fields()))
def test_bad_choice_fails_at_compose_time_naming_key_value_and_choices(key):
    with pytest.raises(ConfigCompositionException) as error:
        _compose(f"{key}=bogus")
    valid = ", ".join(choice_fields()[key])
    assert choice_error_line(error.value) == f"{key}='bogus' is not valid; choose one of {valid}"


def test_choice_values_read_back_as_the_same_strings():
    cfg = _compose("ablation.combine=sum", "extraction.orthogonalize=svd")
    assert cfg.ablation.combine == "sum" and f"{cfg.extraction.orthogonalize}" == "svd"
    container = OmegaConf.to_container(cfg, resolve=True)
    # json and YAML (results.json, provenance hashes, cache keys, .hydra/config.yaml) see strings
    assert json.loads(json.dumps(container))["ablation"]["combine"] == "sum"
    assert "combine: sum\n" in OmegaConf.to_yaml(cfg)


@pytest.mark.parametrize("weight", ["-0.5", "nan", "inf"])
def test_bad_weight_is_rejected(weight):
    with pytest.raises(ConfigError, match="ablation.weight"):
        validate_config(_compose(f"ablation.weight={weight}"))


# --- composition order, trial directory names, --help (issue 13, item 5) ---

REPO = CONF.parent
EXPERIMENT_AT_5 = """# @package _global_
defaults:
  - override /eval: quick
layer: 5
seed: 3
hydra:
  sweep:
    dir: {sweep_dir}
"""


def _hydra_compose(*overrides: str, config_dir: Path = CONF):
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(
            "config",
            overrides=["paths.output_dir=/tmp/unused", *overrides],
            return_hydra_config=True,
        )


@pytest.fixture
def experiment_dir(tmp_path):
    """A config dir holding the repo's conf/ plus an experiment that sets layer, seed, hydra.*."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "at_layer_5.yaml").write_text(
        EXPERIMENT_AT_5.format(sweep_dir=tmp_path / "exp_sweep")
    )
    return conf


def test_experiment_sets_top_level_and_hydra_keys(experiment_dir, tmp_path):
    cfg = _hydra_compose("experiment=at_layer_5", config_dir=experiment_dir)
    assert cfg.layer == 5 and cfg.seed == 3  # not the model's default_layer (22)
    assert cfg.eval.kl_prompts == 8  # its group override applies too
    assert cfg.hydra.sweep.dir == str(tmp_path / "exp_sweep")
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    # the command line still wins over the experiment
    assert _hydra_compose("experiment=at_layer_5", "layer=7", config_dir=experiment_dir).layer == 7
    assert _hydra_compose().layer == _hydra_compose().model.default_layer


def _cli(*args: str, cwd: Path = REPO) -> str:
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_experiment_keys_win_through_the_cli(experiment_dir, tmp_path):
    args = ("--config-dir", str(experiment_dir), "experiment=at_layer_5")
    job = OmegaConf.create(_cli(*args, "--cfg", "job"))
    assert job.layer == 5 and job.seed == 3
    hydra_cfg = OmegaConf.create(_cli(*args, "hydra/launcher=local", "--cfg", "hydra"))
    assert hydra_cfg.hydra.sweep.dir == str(tmp_path / "exp_sweep")
    assert hydra_cfg.hydra.launcher._target_.endswith("LocalLauncher")


def _subdir(*overrides: str) -> str:
    return OmegaConf.select(_hydra_compose(*overrides), "hydra.sweep.subdir")


def test_keys_that_do_not_change_results_never_change_the_directory():
    plain = _subdir("baseline=matched", "layer=3")
    assert plain == "baseline=matched,layer=3"  # as Hydra's override_dirname names it
    for extra in (
        ["logger.tags=[x,y]"], ["logger.mode=online"], ["logger=none"], ["logger=wandb_online"],
        ["force=true"], ["objectives=[eval.refusal_rate,eval.kl_divergence]"],
        ["paths.cache_dir=/shared/cache"], ["logger.tags=[x]", "force=true", "logger.group=g"],
    ):  # fmt: skip
        assert _subdir("baseline=matched", "layer=3", *extra) == plain, extra
    assert _subdir("baseline=matched", "layer=4") != plain
    assert _subdir("baseline=matched", "layer=3", "seed=1") != plain


def test_directory_names_hold_no_path_separator_or_parent():
    subdir = _subdir("model=hub", "model.path=org/name", "model.name=x", "model.default_layer=2")
    assert "/" not in subdir and "model.path=org%2Fname" in subdir
    # distinct values stay distinct directories (an escaped `/` is not a plain `_`)
    assert subdir != _subdir("model=hub", "model.path=org_name", "model.name=x",
                             "model.default_layer=2")  # fmt: skip
    escaping = _subdir("model=hub", "model.path=../../etc", "model.name=x", "model.default_layer=2")
    assert "/" not in escaping and ".." not in escaping
    assert safe_dirname("..") == "%2E%2E" and safe_dirname(".") == "%2E"
    assert safe_dirname("a\\b") == "a%5Cb" and safe_dirname("x%2Fy") == "x%252Fy"
    # the run directory of a single run takes model.name, escaped the same way
    run_dir = _hydra_compose("model.name=org/../name").hydra.run.dir
    assert "org%2F%2E%2E%2Fname" in run_dir and run_dir.count("/") == 2


def test_long_directory_names_are_cut_with_a_hash_of_the_whole_name():
    long_a = _subdir("model.path=" + "a" * 400)
    long_b = _subdir("model.path=" + "a" * 399 + "b")
    for name in (long_a, long_b):
        assert len(name.encode()) <= DIRNAME_MAX_BYTES <= 255
        assert name.startswith("model.path=aaaa")
    assert long_a != long_b  # the same first bytes, different hashes
    assert _subdir("model.path=" + "a" * 400) == long_a  # deterministic: a relaunch finds it
    multibyte = safe_dirname("é" * 300)
    assert len(multibyte.encode()) <= DIRNAME_MAX_BYTES
    assert _subdir("layer=3") == "layer=3"  # short names are not hashed


DUMMY_APP = """
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from abliterate.config import ConfigError, register_configs

register_configs()


@hydra.main(config_path=sys.argv.pop(1), config_name="config", version_base="1.3")
def app(cfg):
    assert ConfigError  # like run.py's app, the task refers to abliterate (imported in the job)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial.json").write_text(json.dumps({"layer": cfg.layer, "seed": cfg.seed}))


if __name__ == "__main__":
    app()
"""


@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_a_real_sweep_names_its_trial_directories_safely(experiment_dir, tmp_path, launcher):
    """Through Hydra's launchers (the submitit one resolves the names in a job process) with a
    stand-in task that only records where it ran: the experiment's sweep dir and layer win,
    logger keys change no name, a `/` in a value makes no nested directory."""
    app = tmp_path / "app.py"
    app.write_text(DUMMY_APP)
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, str(app), str(experiment_dir), "-m", "experiment=at_layer_5",
        f"hydra/launcher={launcher}", "model.path=org/name", "logger.tags=[a]",
        "baseline=matched,unmatched",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = tmp_path / "exp_sweep"
    trials = sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("trial.json"))
    assert trials == [
        f"baseline={b},experiment=at_layer_5,model.path=org%2Fname/trial.json"
        for b in ("matched", "unmatched")
    ]
    assert json.loads((sweep / trials[0]).read_text()) == {"layer": 5, "seed": 3}


def test_the_resolvers_are_registered_on_import():
    """A submitit job unpickles the task (importing abliterate) and resolves its directory in a
    fresh process that never ran register_configs."""
    code = (
        "import abliterate.pipeline; from omegaconf import OmegaConf; "
        "assert OmegaConf.has_resolver('abliterate.trial_dirname'); "
        "assert OmegaConf.has_resolver('abliterate.safe_dirname')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_help_lists_no_schema_as_a_group_choice():
    printed = _cli("--help")
    groups = printed.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: gguf, hub, qwen3_5_2b, smollm2_refuser" in groups
    assert "_schema" not in groups
