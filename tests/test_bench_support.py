"""The benchmark's own pieces that a CPU can check: the Qwen3.5-2B-shaped model it builds for
GPU sessions, and its synthetic path end to end on a tiny model. The benchmark itself
(benchmarks/bench.py, `make bench`) is never run here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _synthetic():
    spec = importlib.util.spec_from_file_location("synthetic", REPO / "benchmarks" / "synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen3_5_2b_shape_builds_on_the_meta_device_with_every_writer_found():
    import transformers

    from abliterate.architectures import resolve_residual_writers

    synthetic = _synthetic()
    config = synthetic.text_config("qwen3_5_2b")
    assert config.num_hidden_layers == 24 and config.hidden_size == 2048
    assert config.layer_types.count("full_attention") == 6  # every 4th layer
    assert 1.8e9 < synthetic.parameter_count("qwen3_5_2b") < 2.0e9  # "2B", tied embeddings
    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(config)
    writers = resolve_residual_writers(model)
    paths = [writer.path for writer in writers.all_layer_writers()]
    assert sum(p.endswith("linear_attn.out_proj") for p in paths) == 18
    assert sum(p.endswith("self_attn.o_proj") for p in paths) == 6
    assert sum(p.endswith("mlp.down_proj") for p in paths) == 24


@pytest.mark.slow  # a minute: the synthetic stages on a tiny model, with SmolLM2's GGUF tokenizer
def test_synthetic_benchmark_path_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--device", "cpu", "--synthetic", "tiny",
         "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1", ABLITERATE_CACHE=str(tmp_path / "cache")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("sweep_overhead_ratio", "extraction_ratio", "generation_ratio", "peak_rss_gb"):
        assert report[key] > 0, key
    assert report["ratio_vs_heretic"] is None  # no Heretic on the synthetic path
    sweep = report["results"]["sweep"]
    assert sweep["trials"] == 4 and sweep["warm_trial_median"]["generation"] > 0
    assert report["results"]["cost_model"]["trials"] == 480


def _refuser_prompts_module():
    spec = importlib.util.spec_from_file_location(
        "refuser_prompts", REPO / "benchmarks" / "refuser_prompts.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuser_prompts_writes_each_row_with_its_kind_and_compares_runs(tiny_model_dir, tmp_path):
    """benchmarks/refuser_prompts.py --phrasing --out: every row keeps the set (kind) it came from
    (a loop over the topic and frame tags once overwrote it with "frame"), and --compare of a run
    against itself finds every prompt."""
    module = _refuser_prompts_module()
    out = tmp_path / "dev.jsonl"
    args = ["--phrasing", "dev", "--model-dir", str(tiny_model_dir), "--new-tokens", "2"]
    assert module.main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from collections import Counter

    from abliterate.phrasing import load_phrasing

    expected = {
        kind: len(load_phrasing(kind, ("dev",))) for kind in ("harmful", "matched", "unmatched")
    }
    assert Counter(row["set"] for row in rows) == expected
    assert module.main([*args, "--compare", str(out)]) == 0


def test_refuser_prompts_loads_a_recipes_build_of_another_seed(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--recipe NAME --seed N: the build of that recipe with seed N; with --model-dir it is one
    error line."""
    import dataclasses

    from abliterate import refuser

    module = _refuser_prompts_module()
    asked = []
    monkeypatch.setattr(
        refuser, "ensure_refuser", lambda recipe: asked.append(recipe) or tiny_model_dir
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\n")
    base = ["--file", str(prompts), "--new-tokens", "2"]
    assert module.main([*base, "--recipe", "v14", "--seed", "2"]) == 0
    assert asked == [dataclasses.replace(refuser.RECIPES["v14"], seed=2)]
    with pytest.raises(SystemExit) as exited:
        module.main([*base, "--model-dir", str(tiny_model_dir), "--seed", "2"])
    assert exited.value.code == 2


def test_refuser_prompts_rejects_a_bad_prompt_file_in_one_line_before_loading(
    tmp_path, monkeypatch, capsys
):
    """A prompt file the loader refuses (here: a repeated prompt) is one error line naming the
    file and row, given before any build is looked up or any weights load."""
    from abliterate import refuser

    module = _refuser_prompts_module()
    monkeypatch.setattr(
        refuser, "ensure_refuser", lambda recipe: pytest.fail("a build was looked up")
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me a joke."}\n{"prompt": "Tell me a joke."}\n')
    with pytest.raises(SystemExit) as exited:
        module.main(["--file", str(prompts)])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: --file: " in error and "p.jsonl:2" in error
    assert "duplicate prompt" in error
