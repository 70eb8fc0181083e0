"""model.device_map (a model spread over devices by accelerate) and the slurm_gpu launcher preset."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_pipeline import compose_trial

from abliterate import models, provenance
from abliterate.config import ConfigError
from abliterate.export import main as export_main
from abliterate.loading import load_model
from abliterate.pipeline import Session, run_trial

PROBE_IDS = torch.tensor([[5, 17, 33, 40, 2]])


def _model_cfg(tiny_model_dir, device_map):
    cfg = compose_trial(tiny_model_dir, tiny_model_dir.parent, f"model.device_map={device_map}")
    return cfg.model


@pytest.mark.parametrize("device_map", ["cpu", "auto", "sequential"])
def test_device_map_loads_the_same_model(tiny_model_dir, device_map, monkeypatch):
    """On this CPU-only machine every map puts the whole model on the CPU (transformers then
    records no hf_device_map); what is checked is that the option reaches from_pretrained, the
    model is not moved afterwards, and inputs go to the embedding's device."""
    plain = load_model(_model_cfg(tiny_model_dir, "null"), "/unused")
    calls = []
    from_pretrained = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("device_map"))
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    placed = load_model(_model_cfg(tiny_model_dir, device_map), "/unused")
    assert calls == [device_map]
    assert placed.device == torch.device("cpu")  # where its inputs go: the embedding's device
    with torch.no_grad():
        torch.testing.assert_close(
            placed.model(PROBE_IDS).logits, plain.model(PROBE_IDS).logits, rtol=0, atol=0
        )


def test_bad_device_map_fails_before_weights_load(tiny_model_dir, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before model.device_map was checked")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(
        ConfigError, match=r"model.device_map='autoo' is not valid; choose one of auto"
    ):
        load_model(_model_cfg(tiny_model_dir, "autoo"), "/unused")


def test_trial_with_device_map_auto_and_its_export(tiny_model_dir, tmp_path):
    cfg = compose_trial(tiny_model_dir, tmp_path, "logger=none", "model.device_map=auto")
    results = run_trial(cfg, session=Session())
    assert results["config"]["model"]["device_map"] == "auto"
    assert results["eval"]["n_harmful"] == 18
    assert export_main([str(tmp_path / "out"), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_unset_device_map_keeps_earlier_config_hashes(tiny_model_dir, tmp_path):
    """A trial configured before model.device_map existed keeps its hash (no rerun on relaunch);
    setting it is a different config."""
    cfg = compose_trial(tiny_model_dir, tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    del container["model"]["device_map"]
    assert provenance.config_hash(cfg) == provenance.config_hash(container)
    placed = compose_trial(tiny_model_dir, tmp_path, "model.device_map=auto")
    assert provenance.config_hash(placed) != provenance.config_hash(cfg)


def test_slurm_gpu_preset_asks_for_a_gpu_and_keeps_the_slurm_keys():
    from hydra import compose, initialize_config_dir
    from test_pipeline import CONF

    from abliterate.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        gpu = compose(
            "config", overrides=["hydra/launcher=slurm_gpu", "paths.output_dir=/tmp/unused"],
            return_hydra_config=True,
        ).hydra.launcher  # fmt: skip
        cpu = compose(
            "config", overrides=["hydra/launcher=slurm", "paths.output_dir=/tmp/unused"],
            return_hydra_config=True,
        ).hydra.launcher  # fmt: skip
    assert gpu.gpus_per_node == 1 and cpu.gpus_per_node == 0
    assert gpu.mem_gb > cpu.mem_gb and gpu.cpus_per_task > cpu.cpus_per_task
    gpu_keys, cpu_keys = (OmegaConf.to_container(c, resolve=False) for c in (gpu, cpu))
    different = {k for k in cpu_keys if cpu_keys[k] != gpu_keys[k]}  # type: ignore[index]
    assert different == {"gpus_per_node", "mem_gb", "cpus_per_task"}
