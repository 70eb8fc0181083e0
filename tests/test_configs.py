"""Every config group option and every experiment file composes, and typos fail at compose time."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from abliterate.config import CHOICES, ConfigError, register_configs, validate_config

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


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_names_key_value_and_choices(key):
    cfg = _compose(f"{key}=bogus")
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert key in message and "bogus" in message and CHOICES[key][0] in message


@pytest.mark.parametrize("weight", ["-0.5", "nan", "inf"])
def test_bad_weight_is_rejected(weight):
    with pytest.raises(ConfigError, match="ablation.weight"):
        validate_config(_compose(f"ablation.weight={weight}"))
