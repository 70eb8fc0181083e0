"""Performance, measured side by side: abliterate's trials against bare transformers and Heretic.

    make bench                                       # the full CPU benchmark (writes latest.json)
    make bench ARGS=--quick                          # a few minutes: small sizes, checks it all runs
    python benchmarks/bench.py --device cuda         # the same stages on a random-init model with
                                                     # Qwen3.5-2B's shape, and the study's cost model
    python benchmarks/bench.py --device cpu --synthetic tiny   # that path on a tiny model (no GPU)

Every figure is a ratio of two times taken in the same run on the same machine, so it travels
between machines better than a time does:

- ``ratio_vs_heretic``: our time per evaluated configuration / Heretic's median time per trial,
  at equal work (same model, harmful prompts, response length, first-token KL prompts).
- ``sweep_overhead_ratio``: an N-trial sweep (``run.py -m``, one process) / (setup + N x floor);
  the floor is a bare batched ``generate`` plus one KL forward on the same prompts and lengths,
  setup is what a sweep pays once (process start, load, extraction, the unedited evaluation).
- ``extraction_ratio``: a bare ``model(..., output_hidden_states=True)`` loop / our extraction.
- ``generation_ratio``: our generation's tokens/s / a bare ``generate``'s, at equal tokens.
- ``peak_rss_gb``: the sweep process's peak resident memory.

Nothing here is run by the test suite (``tests/`` is pytest's only path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peak_memory import PeakRss

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONF = REPO / "conf"

TARGETS = {  # name: (comparison, bound), as the issue sets them
    "ratio_vs_heretic": ("<=", 0.5),
    "sweep_overhead_ratio": ("<=", 1.25),
    "extraction_ratio": (">=", 0.8),
    "generation_ratio": (">=", 0.9),
    "peak_rss_gb": ("<=", 2.5),
}
# the study's grid (multirun_scripts/petrov_grid_qwen3_5_2b_slurm.sh) and its distinct direction
# sets: 2 baselines x 24 layers x 5 weights x 2 orthogonalizations; SOMs per (baseline, layer,
# orthogonalization)
STUDY_TRIALS = 2 * 24 * 5 * 2
STUDY_DIRECTION_SETS = 2 * 24 * 2


@dataclass
class Sizes:
    """How much work each measurement does."""

    n_harmful: int = 32  # harmful evaluation prompts (Heretic's bad_evaluation_prompts)
    kl_prompts: int = 32  # harmless prompts for first-token KL (good_evaluation_prompts)
    max_new_tokens: int = 32
    layers: list[int] = field(default_factory=lambda: [16, 18, 20, 22, 24])
    weights: list[float] = field(default_factory=lambda: [1.0, 0.5])
    heretic_trials: int = 6
    repeats: int = 3  # bare-vs-ours timings: median of this many
    # overrides that shrink extraction in --quick (the full run uses the whole corpus split)
    data_overrides: list[str] = field(default_factory=list)
    som_iterations: int | None = None  # None: the config's (10000)

    @property
    def trials(self) -> int:
        return 2 * len(self.layers) * len(self.weights)  # baselines x layers x weights


FULL = Sizes()
QUICK = Sizes(
    n_harmful=8,
    kl_prompts=8,
    max_new_tokens=8,
    layers=[22],
    weights=[1.0, 0.5],
    heretic_trials=2,
    repeats=1,
    data_overrides=[
        "data.harmful_train.per_category=2",
        "data.matched_train.per_category=2",
        "data.unmatched_train.limit=18",
    ],
    som_iterations=300,
)


# ------------------------------------------------------------------------------ configuration


def trial_overrides(args: argparse.Namespace, sizes: Sizes, cache_dir: Path) -> list[str]:
    """The equal-work trial: conf/eval/heretic_equal.yaml at these sizes, nothing tracked."""
    overrides = [
        "eval=heretic_equal",
        f"eval.n_harmful={sizes.n_harmful}",
        f"eval.kl_prompts={sizes.kl_prompts}",
        f"eval.max_new_tokens={sizes.max_new_tokens}",
        "logger=none",
        f"paths.cache_dir={cache_dir}",
        *sizes.data_overrides,
    ]
    if sizes.som_iterations is not None:
        overrides.append(f"extraction.iterations={sizes.som_iterations}")
    if args.model_dir is not None:  # a model directory given by hand instead of the embedded one
        overrides += [
            "model=hub",
            f"model.path={args.model_dir}",
            "model.name=smollm2-135m-refuser",
            "model.default_layer=22",
            "model.batch_size=32",
        ]
    return overrides


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from abliterate.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded refuser's directory, resolved through the package (built if missing)."""
    from abliterate.refuser import ensure_refuser

    return ensure_refuser(cache_dir)


def train_prompts(cfg: Any) -> list[str]:
    """The extraction prompts (harmful, matched and unmatched train sets), as a trial loads them."""
    from abliterate.prompts import load_prompt_set

    categories = list(cfg.data.categories) or None
    return [
        prompt
        for name in ("harmful_train", "matched_train", "unmatched_train")
        for prompt in load_prompt_set(name, cfg.data[name], categories).prompts
    ]


def cold_cache(workdir: Path, real_cache: Path) -> Path:
    """An empty project cache (no activations, no baseline evaluation) that still sees the
    built embedded model."""
    cache = workdir / "cache"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(real_cache / "models", target_is_directory=True)
    return cache


# ------------------------------------------------------------------------------ timing helpers


def median_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def batches(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


# ------------------------------------------------------------------------------ bare baselines


@torch.inference_mode()
def bare_generate(
    loaded: Any, prompts: list[str], max_new_tokens: int, fixed_length: bool = False
) -> int:
    """A plain batched greedy ``generate`` (no early stop). With ``fixed_length`` every row gets
    exactly ``max_new_tokens`` (the floor: a trial's responses may all run to the cap, and the
    unedited model's short refusals would understate it). Returns the tokens generated."""
    from abliterate.generation import count_new_tokens
    from abliterate.templates import format_chat

    tokenizer = loaded.tokenizer
    texts = format_chat(tokenizer, prompts, loaded.system_prompt, loaded.disable_thinking)
    tokens = 0
    for chunk in batches(texts, loaded.batch_size):
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            loaded.device
        )
        output = loaded.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if fixed_length else None,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        generated = output[:, encoded["input_ids"].shape[1] :]
        tokens += count_new_tokens(generated, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return tokens


@torch.inference_mode()
def bare_kl_forward(loaded: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    kl_tokens: int) -> None:  # fmt: skip
    """One forward pass per batch over the KL inputs and the log-softmax of the positions KL
    reads: the floor of a KL measurement (given the same ``logits_to_keep`` we use)."""
    for start in range(0, len(input_ids), loaded.batch_size):
        rows = slice(start, start + loaded.batch_size)
        logits = loaded.model(
            input_ids=input_ids[rows].to(loaded.device),
            attention_mask=attention_mask[rows].to(loaded.device),
            use_cache=False,
            logits_to_keep=kl_tokens,
        ).logits
        torch.log_softmax(logits.float(), dim=-1).cpu()


@torch.inference_mode()
def bare_extraction(loaded: Any, prompts: list[str]) -> torch.Tensor:
    """What one writes without the package: batches in the given order, the full model with
    ``output_hidden_states=True``, every layer's last-token state."""
    from abliterate.templates import format_chat

    tokenizer = loaded.tokenizer
    texts = format_chat(tokenizer, prompts, loaded.system_prompt, loaded.disable_thinking)
    rows = []
    for chunk in batches(texts, loaded.batch_size):
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(
            loaded.device
        )
        hidden = loaded.model(**encoded, output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[:, -1] for h in hidden[1:]], dim=1).float().cpu())
    return torch.cat(rows)  # (n, n_layers, d_model)


# ------------------------------------------------------------------------------ measurements


def measure_model_paths(loaded: Any, cfg: Any, sizes: Sizes, train_prompts: list[str]) -> dict:
    """Bare baselines against our code paths, in this process, on the unedited model."""
    from abliterate.activations import run_forward_passes
    from abliterate.evaluation import (
        compute_kl,
        compute_kl_reference,
        evaluate_responses,
        select_eval_prompts,
    )
    from abliterate.generation import generate
    from abliterate.prompts import load_prompt_set

    categories = list(cfg.data.categories) or None
    sets = {
        name: load_prompt_set(name, cfg.data[name], categories)
        for name in ("harmful_eval", "unmatched_eval", "matched_eval")
    }
    eval_prompts = select_eval_prompts(
        sets["harmful_eval"], sets["unmatched_eval"], sets["matched_eval"], cfg.eval
    )
    # every prompt a trial generates for: harmful, and the false-refusal sets when configured
    generated = [
        prompt
        for prompt_set in (eval_prompts.harmful, eval_prompts.unmatched, eval_prompts.matched)
        for prompt in prompt_set.prompts
    ]
    kl_tokens, new_tokens, repeats = cfg.eval.kl_tokens, cfg.eval.max_new_tokens, sizes.repeats
    reference = compute_kl_reference(loaded, eval_prompts.kl, kl_tokens, cfg.eval.kl_top_k)
    bare_generate(loaded, generated[:2], 2)  # warm-up: first calls pay for allocation
    figures: dict[str, Any] = {"n_generated": len(generated), "n_kl": len(reference.input_ids)}

    floor_gen_s, floor_tokens = median_time(
        lambda: bare_generate(loaded, generated, new_tokens, fixed_length=True), repeats
    )
    bare_gen_s, bare_tokens = median_time(
        lambda: bare_generate(loaded, generated, new_tokens), repeats
    )
    ours_gen_s, ours = median_time(
        lambda: generate(loaded, generated, new_tokens, loaded.batch_size), repeats
    )
    # as a trial runs it: per set, early stop, the harmful set's activations captured, labels
    early_s, early_sets = median_time(
        lambda: evaluate_responses(loaded, eval_prompts, cfg.eval, cfg.extraction.position),
        repeats,
    )
    bare_kl_s, _ = median_time(
        lambda: bare_kl_forward(loaded, reference.input_ids, reference.attention_mask, kl_tokens),
        repeats,
    )
    ours_kl_s, _ = median_time(lambda: compute_kl(loaded, reference), repeats)
    figures.update(
        floor_generate_s=floor_gen_s,
        floor_generate_tokens=floor_tokens,
        bare_generate_s=bare_gen_s,
        bare_generate_tokens=bare_tokens,
        bare_tokens_per_s=bare_tokens / bare_gen_s,
        ours_generate_s=ours_gen_s,
        ours_generate_tokens=ours.new_tokens,
        ours_tokens_per_s=ours.new_tokens / ours_gen_s,
        generation_ratio=(ours.new_tokens / ours_gen_s) / (bare_tokens / bare_gen_s),
        evaluation_generate_s=early_s,
        evaluation_refusals=sum(label == "REFUSE" for label in early_sets["harmful"].labels),
        early_stop_speedup=bare_gen_s / early_s,
        bare_kl_forward_s=bare_kl_s,
        ours_kl_s=ours_kl_s,
        kl_ratio=ours_kl_s / bare_kl_s,
        floor_s=floor_gen_s + bare_kl_s,
    )

    extraction_repeats = 1  # long (the whole extraction split), and averaged over its batches
    bare_ex_s, bare_values = median_time(
        lambda: bare_extraction(loaded, train_prompts), extraction_repeats
    )
    ours_ex_s, ours_values = median_time(
        lambda: run_forward_passes(loaded, train_prompts, "last", loaded.batch_size),
        extraction_repeats,
    )
    # the two must agree (the last layer differs: hidden_states[-1] has the final norm applied)
    agreement = float(
        (bare_values[:, :-1] - ours_values[:, :-1]).abs().max()
        / bare_values[:, :-1].abs().max().clamp_min(1e-12)
    )
    figures.update(
        n_extraction_prompts=len(train_prompts),
        bare_extraction_s=bare_ex_s,
        ours_extraction_s=ours_ex_s,
        extraction_ratio=bare_ex_s / ours_ex_s,
        extraction_max_relative_difference=agreement,
    )
    return figures


def measure_edit_restore(loaded: Any, cfg: Any, repeats: int) -> float:
    """Seconds to edit every residual writer (scope=all) and restore it bit-exactly."""
    from omegaconf import OmegaConf

    from abliterate.ablation import apply_weight_ablation, effective_combine
    from abliterate.architectures import resolve_residual_writers

    writers = resolve_residual_writers(loaded.model)
    direction = torch.randn(1, writers.d_model, generator=torch.Generator().manual_seed(0))
    ablation = OmegaConf.merge(
        cfg.ablation, {"combine": effective_combine(cfg.ablation, cfg.extraction.orthogonalize)}
    )

    def edit_and_restore() -> None:
        with apply_weight_ablation(writers, direction, cfg.layer, ablation):
            pass

    seconds, _ = median_time(edit_and_restore, repeats)
    return seconds


def _job_times(sweep_dir: Path) -> list[dict]:
    """Each job of a finished sweep: its results and when it started and ended (file times:
    Hydra writes .hydra/config.yaml when a job starts, the trial writes results.json last)."""
    jobs = []
    for results_path in sweep_dir.glob("*/results.json"):
        results = json.loads(results_path.read_text())
        jobs.append(
            {
                "name": results_path.parent.name,
                "start": (results_path.parent / ".hydra" / "config.yaml").stat().st_mtime,
                "end": results_path.stat().st_mtime,
                "timing_s": results["timing_s"],
            }
        )
    return sorted(jobs, key=lambda job: job["end"])


STAGES = ("load", "activations", "directions", "baseline_evaluation", "ablation", "generation",
          "kl", "geometry", "records")  # fmt: skip


def warm_trial_summary(warm: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-stage median and mean over the warm trials of a sweep."""
    tables = [stage_table(job["timing_s"]) for job in warm]
    stages = (*STAGES, "other", "total")
    return {
        "warm_trial_median": {s: statistics.median(t[s] for t in tables) for s in stages},
        "warm_trial_mean": {s: statistics.mean(t[s] for t in tables) for s in stages},
    }


def stage_table(timing: dict[str, float]) -> dict[str, float]:
    table = {stage: timing.get(stage, 0.0) for stage in STAGES}
    table["other"] = timing["total"] - sum(table.values())
    table["total"] = timing["total"]
    return table


def run_sweep(overrides: list[str], sizes: Sizes, workdir: Path, log: Path) -> dict:
    """The default sweep's shape (baselines x layers x weights) through ``run.py -m``, one
    process, as a researcher runs it; its wall time, jobs and peak resident memory."""
    sweep_dir = workdir / "sweep"
    command = [
        sys.executable, "run.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}",
        # jobs named by number: the overrides would exceed a file name's 255 characters
        "hydra.sweep.subdir=${hydra.job.num}",
        "baseline=matched,unmatched", f"layer={','.join(map(str, sizes.layers))}",
        f"ablation.weight={','.join(map(str, sizes.weights))}",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with log.open("w") as output:
        launched = time.time()
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=output)
        with PeakRss(process.pid) as peak:
            process.wait()
        wall = time.perf_counter() - start
        exited = time.time()
    if process.returncode != 0:
        raise RuntimeError(f"the sweep failed (exit {process.returncode}); see {log}")
    jobs = _job_times(sweep_dir)
    if len(jobs) != sizes.trials:
        raise RuntimeError(f"the sweep wrote {len(jobs)} results, expected {sizes.trials}")
    cold, warm = jobs[0], jobs[1:]
    # a warm job's cost: from the previous job's end to its own (the launcher's work included)
    warm_job_s = [job["end"] - previous["end"] for previous, job in zip(jobs, warm, strict=False)]
    startup = cold["start"] - launched
    one_time = sum(cold["timing_s"].get(s, 0.0) for s in ("load", "activations",
                                                           "baseline_evaluation"))  # fmt: skip
    return {
        "trials": len(jobs),
        "command": " ".join(command[1:]),
        "wall_s": wall,
        "process_startup_s": startup,
        "teardown_s": exited - jobs[-1]["end"],
        "setup_s": startup + one_time,
        "cold_trial": stage_table(cold["timing_s"]),
        **warm_trial_summary(warm),
        "warm_job_s": warm_job_s,
        "median_warm_job_s": statistics.median(warm_job_s),
        "mean_warm_job_s": statistics.mean(warm_job_s),
        "launcher_gap_median_s": statistics.median(
            job["start"] - previous["end"] for previous, job in zip(jobs, warm, strict=False)
        ),
        "peak_rss_gb": peak.gb,
    }


def run_heretic_side(model_dir: Path, cfg: Any, sizes: Sizes, workdir: Path, device: str,
                     batch_size: int) -> dict:  # fmt: skip
    import heretic_side

    from abliterate.evaluation import select_eval_prompts
    from abliterate.prompts import load_prompt_set

    categories = list(cfg.data.categories) or None
    sets = {name: load_prompt_set(name, cfg.data[name], categories) for name in
            ("harmful_train", "unmatched_train", "harmful_eval", "unmatched_eval",
             "matched_eval")}  # fmt: skip
    eval_prompts = select_eval_prompts(
        sets["harmful_eval"], sets["unmatched_eval"], sets["matched_eval"], cfg.eval
    )
    directory = workdir / "heretic"
    directory.mkdir()
    heretic_side.ensure_heretic(workdir / "heretic-install.log")
    heretic_side.write_config(
        directory,
        model_dir,
        {
            "good": list(sets["unmatched_train"].prompts),
            "bad": list(sets["harmful_train"].prompts),
            "good_evaluation": list(eval_prompts.kl.prompts),
            "bad_evaluation": list(eval_prompts.harmful.prompts),
        },
        max_new_tokens=sizes.max_new_tokens,
        batch_size=batch_size,
        n_trials=sizes.heretic_trials,
        device=device,
    )
    return heretic_side.run_heretic(directory, timeout_s=3600)


def measure_startup() -> float:
    """A fresh process importing what a trial needs (a SLURM job pays this per trial)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import abliterate.pipeline, abliterate.tracking"],
        check=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ the two modes


def run_embedded(args: argparse.Namespace, sizes: Sizes, workdir: Path, note: Callable) -> dict:
    """The CPU benchmark on the embedded model (or --model-dir)."""
    from abliterate.models import load_model
    from abliterate.refuser import cache_root

    real_cache = cache_root()
    model_dir = Path(args.model_dir) if args.model_dir else embedded_model_dir(real_cache)
    cache = cold_cache(workdir, real_cache)
    overrides = trial_overrides(args, sizes, cache)
    cfg = compose([*overrides, f"paths.output_dir={workdir / 'out'}"])
    results: dict[str, Any] = {"model_dir": str(model_dir), "overrides": overrides}

    note("bare transformers vs our code paths (in this process)")
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    results["paths"] = measure_model_paths(loaded, cfg, sizes, train_prompts(cfg))
    results["paths"]["edit_restore_s"] = measure_edit_restore(loaded, cfg, sizes.repeats)
    batch_size = loaded.batch_size
    del loaded

    note(f"the {sizes.trials}-trial sweep (run.py -m, cold cache)")
    results["sweep"] = run_sweep(overrides, sizes, workdir, workdir / "sweep.log")

    if args.no_heretic:
        results["heretic"] = None
    else:
        note(f"Heretic {sizes.heretic_trials} trials (its own venv)")
        results["heretic"] = run_heretic_side(model_dir, cfg, sizes, workdir, "cpu", batch_size)
    return results


def run_synthetic(args: argparse.Namespace, sizes: Sizes, workdir: Path, note: Callable) -> dict:
    """The same stages on a random-init Qwen3.5-2B-shaped model (or its tiny version), in one
    process, with the study's evaluation (eval=petrov) for the cost model."""
    import synthetic

    from abliterate.directions import extract_directions
    from abliterate.models import LoadedModel, choose_batch_size
    from abliterate.pipeline import Session, effective_extraction, run_trial

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = args.synthetic
    note(f"building the random-init {scale} model on {device}")
    tokenizer = synthetic.chat_tokenizer()
    build_start = time.perf_counter()
    model = synthetic.build_model(scale, device, dtype)
    build_s = time.perf_counter() - build_start
    loaded = LoadedModel(
        model, tokenizer, f"synthetic-{scale}", f"synthetic:{scale}:seed0", device,
        batch_size=args.batch_size or choose_batch_size(model, device),
    )  # fmt: skip
    eval_group = "quick" if args.quick else "petrov"
    overrides = [
        "model=hub", f"model.path=synthetic/{scale}", f"model.name=synthetic-{scale}",
        f"model.default_layer={model.config.num_hidden_layers // 2}",
        f"model.batch_size={loaded.batch_size}", f"eval={eval_group}", "logger=none",
        f"paths.cache_dir={workdir / 'cache'}", f"paths.output_dir={workdir / 'out'}",
        *sizes.data_overrides,
    ]  # fmt: skip
    if sizes.som_iterations is not None:
        overrides.append(f"extraction.iterations={sizes.som_iterations}")
    cfg = compose(overrides)
    results: dict[str, Any] = {
        "model": f"random-init Qwen3_5ForCausalLM, {scale} shape",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype),
        "batch_size": loaded.batch_size,
        "eval": eval_group,
        "build_s": build_s,
        "overrides": overrides,
    }
    note("bare transformers vs our code paths")
    results["paths"] = measure_model_paths(loaded, cfg, sizes, train_prompts(cfg))
    results["paths"]["edit_restore_s"] = measure_edit_restore(loaded, cfg, sizes.repeats)
    note("loading the same weights from disk (what a SLURM job pays)")
    results["load_s"] = measure_load(model, workdir / "saved", device, dtype)

    note("SOM directions at one layer (9 categories, CPU)")
    harmful = torch.randn(216, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    harmful_categories = [c for c in cfg.data.categories for _ in range(24)]
    som_s, _ = median_time(
        lambda: extract_directions(
            harmful, harmful_categories, "unmatched", harmful.double().mean(0) * 0.5, None,
            effective_extraction(cfg), cfg.layer,
        ),
        1,
    )  # fmt: skip
    results["paths"]["som_directions_s"] = som_s

    session = Session()
    session.use_model(cfg.model, loaded)
    # as many layers as the CPU benchmark sweeps, around the middle of the stack
    last = model.config.num_hidden_layers - 1
    around = [max(0, min(cfg.model.default_layer + d, last)) for d in (0, -2, 2, -4, 4)]
    layers = list(dict.fromkeys(around))[: len(sizes.layers)]
    grid = [
        (f"{baseline}_L{layer}_w{weight}",
         compose([*overrides, f"baseline={baseline}", f"layer={layer}",
                  f"ablation.weight={weight}",
                  f"paths.output_dir={workdir / 'trials' / f'{baseline}_L{layer}_w{weight}'}"]))
        for baseline in ("matched", "unmatched") for layer in layers for weight in sizes.weights
    ]  # fmt: skip
    note(f"{len(grid)} trials in one session")
    jobs = []
    start = time.perf_counter()
    for name, trial_cfg in grid:
        job_start = time.perf_counter()
        trial = run_trial(trial_cfg, workdir / "trials" / name, session=session)
        jobs.append({"s": time.perf_counter() - job_start, "timing_s": trial["timing_s"]})
    sweep_s = time.perf_counter() - start
    cold, warm = jobs[0], jobs[1:]
    one_time = sum(cold["timing_s"].get(s, 0.0) for s in ("load", "activations",
                                                           "baseline_evaluation"))  # fmt: skip
    results["sweep"] = {
        "trials": len(jobs),
        "wall_s": build_s + sweep_s,  # a sweep's process loads (here: builds) the model first
        "setup_s": build_s + one_time,
        "cold_trial": stage_table(cold["timing_s"]),
        **warm_trial_summary(warm),
        "median_warm_job_s": statistics.median(job["s"] for job in warm),
        "mean_warm_job_s": statistics.mean(job["s"] for job in warm),
        "peak_rss_gb": _peak_rss_gb(),
    }
    if device.type == "cuda":
        results["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["cost_model"] = cost_model(results, measure_startup())
    results["heretic"] = None
    return results


def measure_load(model: Any, directory: Path, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds to load ``model``'s weights with ``from_pretrained`` onto ``device`` (saved first,
    as safetensors, in ``dtype``)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(directory)
    start = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del loaded
    shutil.rmtree(directory, ignore_errors=True)
    return seconds


def cost_model(results: dict, startup_s: float) -> dict:
    """The study's grid (480 trials, 96 direction sets) from this run's measured stage times.

    One GPU, one process: setup once, then per trial its evaluation (the warm trial without
    its directions) and one SOM per direction set. N GPUs through SLURM (one job per trial): the
    first job extracts and evaluates the unedited model; every job then pays a process start, a
    model load, its own SOM (directions are not shared between jobs) and its evaluation, and the
    jobs run N at a time.
    """
    sweep = results["sweep"]
    warm = sweep["warm_trial_median"]
    per_trial = warm["total"] - warm["directions"]
    som = results["paths"]["som_directions_s"]
    one_gpu = sweep["setup_s"] + STUDY_TRIALS * per_trial + STUDY_DIRECTION_SETS * som
    per_job = startup_s + results["load_s"] + som + per_trial
    return {
        "trials": STUDY_TRIALS,
        "direction_sets": STUDY_DIRECTION_SETS,
        "per_trial_evaluation_s": per_trial,
        "som_per_direction_set_s": som,
        "setup_s": sweep["setup_s"],
        "one_gpu_s": one_gpu,
        "slurm_job_s": per_job,
        "process_startup_s": startup_s,
        "load_s": results["load_s"],
        "slurm_s": {
            str(n): sweep["setup_s"] + math.ceil(STUDY_TRIALS / n) * per_job for n in (8, 32, 96)
        },
        "note": "load_s is a from_pretrained of the same weights from local disk; a shared "
        "file system on a cluster is usually slower",
    }


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------ the figures


def headline(results: dict) -> dict[str, float | None]:
    paths, sweep, heretic = results["paths"], results["sweep"], results.get("heretic")
    trials = sweep["trials"]
    denominator = sweep["setup_s"] + trials * paths["floor_s"]
    # the mean, not the median: a new (baseline, layer) pays for its SOM and a new weight does
    # not, and a sweep pays for both
    ours_per_configuration = sweep["mean_warm_job_s"]
    return {
        "ratio_vs_heretic": (
            ours_per_configuration / heretic["median_trial_s"] if heretic else None
        ),
        "sweep_overhead_ratio": sweep["wall_s"] / denominator,
        "extraction_ratio": paths["extraction_ratio"],
        "generation_ratio": paths["generation_ratio"],
        "peak_rss_gb": sweep["peak_rss_gb"],
        # the same comparison without the setup that dilutes it: one warm trial vs the floor
        "warm_trial_to_floor_ratio": ours_per_configuration / paths["floor_s"],
    }


def diagnose(results: dict, figures: dict[str, float | None]) -> list[str]:
    """For each missed target, the stage that holds it back, from this run's numbers."""
    paths, sweep, heretic = results["paths"], results["sweep"], results.get("heretic")
    warm = sweep["warm_trial_mean"]
    floor = paths["floor_s"]
    beyond_floor = {  # a warm trial's stages besides its generation and KL, largest first
        stage: warm[stage]
        for stage in ("ablation", "directions", "geometry", "records", "other")
        if warm[stage] > 0.005
    }
    if "launcher_gap_median_s" in sweep:
        beyond_floor["launcher (Hydra, between jobs)"] = sweep["launcher_gap_median_s"]
    ranked = ", ".join(
        f"{stage} {seconds:.2f} s" for stage, seconds in
        sorted(beyond_floor.items(), key=lambda item: -item[1])
    )  # fmt: skip
    lines = []
    missed = {name for name, text in verdicts(figures).items() if text.startswith("MISSED")}
    if "ratio_vs_heretic" in missed and heretic:
        lines.append(
            f"ratio_vs_heretic is held back by generation: a warm trial spends "
            f"{warm['generation']:.2f} s generating and {warm['kl']:.2f} s on KL of its "
            f"{sweep['mean_warm_job_s']:.2f} s; the floor alone (bare generate + KL forward) is "
            f"{floor:.2f} s = {floor / heretic['median_trial_s']:.2f} of Heretic's trial "
            f"({heretic['median_trial_s']:.2f} s). Both tools decode the same model over the same "
            "prompts, so ours can only be far below Heretic's where early stopping saves "
            f"decoding; the rest of ours: {ranked}"
        )
    if "sweep_overhead_ratio" in missed:
        lines.append(f"sweep_overhead_ratio: a warm trial's work besides the floor: {ranked}")
    if "extraction_ratio" in missed:
        lines.append(
            f"extraction_ratio: ours {paths['ours_extraction_s']:.2f} s vs bare "
            f"{paths['bare_extraction_s']:.2f} s for {paths['n_extraction_prompts']} prompts"
        )
    if "generation_ratio" in missed:
        lines.append(
            f"generation_ratio: ours {paths['ours_tokens_per_s']:.1f} tokens/s vs bare "
            f"{paths['bare_tokens_per_s']:.1f} (single runs are noisy on a busy machine)"
        )
    if "peak_rss_gb" in missed:
        lines.append(f"peak_rss_gb: the sweep process peaked at {sweep['peak_rss_gb']:.2f} GB")
    return lines


def verdicts(figures: dict[str, float | None]) -> dict[str, str]:
    out = {}
    for name, (comparison, bound) in TARGETS.items():
        value = figures.get(name)
        if value is None:
            out[name] = "not measured"
        else:
            met = value <= bound if comparison == "<=" else value >= bound
            out[name] = f"{'met' if met else 'MISSED'} (target {comparison} {bound})"
    return out


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Qwen3.5's linear attention falls back to slow reference code without these
        "flash_linear_attention": importlib.util.find_spec("fla") is not None,
        "causal_conv1d": importlib.util.find_spec("causal_conv1d") is not None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average_at_start"] = os.getloadavg()
    except ImportError:
        pass
    import transformers

    info["transformers"] = transformers.__version__
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_report(report: dict) -> None:
    results, figures = report["results"], report["figures"]
    sweep, paths = results["sweep"], results["paths"]
    print(f"\nabliterate benchmark ({report['mode']}) on {report['machine']['cpu']}, "
          f"{report['machine']['cpu_count']} cores, torch threads "
          f"{report['machine']['torch_threads']}, gpu {report['machine']['gpu']}")  # fmt: skip
    print(f"\nper-stage seconds      cold trial   warm trial (median of {sweep['trials'] - 1})")
    for stage in (*STAGES, "other", "total"):
        print(f"  {stage:22s} {sweep['cold_trial'][stage]:9.2f}   "
              f"{sweep['warm_trial_median'][stage]:9.2f}")  # fmt: skip
    print(f"  per warm job (launcher included): mean {sweep['mean_warm_job_s']:.2f} s, median "
          f"{sweep['median_warm_job_s']:.2f} s; "
          f"setup {sweep['setup_s']:.1f} s; sweep {sweep['wall_s']:.1f} s")  # fmt: skip
    print(
        f"\nfloor: bare generate {paths['floor_generate_s']:.2f} s ({paths['n_generated']} "
        f"prompts x {paths['floor_generate_tokens'] // max(1, paths['n_generated'])} tokens) + KL "
        f"forward {paths['bare_kl_forward_s']:.2f} s = {paths['floor_s']:.2f} s"
    )
    print(
        f"unedited model, responses ending where they end: bare generate "
        f"{paths['bare_generate_s']:.2f} s, ours {paths['ours_generate_s']:.2f} s, ours as a "
        f"trial runs it (early stop, rows dropped) {paths['evaluation_generate_s']:.2f} s; "
        f"KL ours {paths['ours_kl_s']:.2f} s"
    )
    print(f"extraction: bare {paths['bare_extraction_s']:.2f} s, ours "
          f"{paths['ours_extraction_s']:.2f} s ({paths['n_extraction_prompts']} prompts); "
          f"edit+restore (scope=all) {paths['edit_restore_s'] * 1000:.0f} ms")  # fmt: skip
    heretic = results.get("heretic")
    if heretic:
        print(f"Heretic {heretic['version']}: median trial {heretic['median_trial_s']:.2f} s "
              f"({', '.join(f'{t:.1f}' for t in heretic['trial_s'])}), setup "
              f"{heretic['setup_s']:.1f} s, peak RSS {heretic['peak_rss_gb']:.2f} GB")  # fmt: skip
    print("\nfigure                      value    target")
    for name, value in figures.items():
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"  {name:26s} {shown:>7s}   {report['verdicts'].get(name, '')}")
    if "cost_model" in results:
        cost = results["cost_model"]
        print(
            f"\nstudy grid ({cost['trials']} trials): one GPU {cost['one_gpu_s'] / 3600:.2f} h; "
            + ", ".join(f"{n} GPUs {s / 3600:.2f} h" for n, s in cost["slurm_s"].items())
        )
    for line in report["notes"]:
        print(f"note: {line}")


NOTES_SYNTHETIC = [
    "random-init weights with the real shape: generation runs to max_new_tokens (no row ends or "
    "refuses), directions and KL are meaningless; the times are what the shapes cost",
    "sweep_overhead_ratio's setup is the model build plus the first trial's extraction and "
    "unedited evaluation; the sweep runs in this process (a Session given the built model)",
    "generation_ratio compares tokens/s at equal tokens (early stop off on both sides)",
    "the floor generates exactly max_new_tokens for every prompt",
    "the floor's KL forward computes only the logits KL reads (logits_to_keep), as ours does",
]
NOTES = [
    "equal work: our trial runs conf/eval/heretic_equal.yaml: the same harmful prompts and "
    "response length and first-token KL on the same harmless prompts as Heretic's trial; our "
    "false-refusal sets are off (n_unmatched=n_matched=0). Extra work on our side, included: "
    "SOM directions for each new (baseline, layer), geometry, and writing results.json, "
    "completions.jsonl and directions.safetensors. Heretic computes its directions once.",
    "our generation stops a row once its label is decided (a refusal marker) or it ended and "
    "drops done rows from the batch; Heretic's runs every row to max_response_length unless all "
    "rows end",
    "the floor generates exactly max_new_tokens for every prompt (a trial's responses may all run "
    "to the cap; the unedited model's short refusals would understate it)",
    "Heretic runs with our batch size and float32, no response-prefix search, an empty system "
    "turn (4 template tokens more per prompt than ours), all trials random (no TPE fitting)",
    "generation_ratio compares tokens/s at equal tokens (early stop off on both sides); "
    "early_stop_speedup is the wall-time gain of the evaluation's early stop on the unedited model",
    "the floor's KL forward computes only the logits KL reads (logits_to_keep), as ours does",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks everything runs")
    parser.add_argument("--device", default="cpu", help="cpu (embedded model) or cuda (synthetic)")
    parser.add_argument(
        "--synthetic", choices=("qwen3_5_2b", "tiny"), default=None,
        help="random-init Qwen3.5 model instead of the embedded one (default with --device cuda)",
    )  # fmt: skip
    parser.add_argument("--model-dir", default=None, help="this model directory, not the embedded")
    parser.add_argument("--no-heretic", action="store_true", help="skip the Heretic comparison")
    parser.add_argument("--batch-size", type=int, default=0, help="synthetic: 0 = auto")
    parser.add_argument("--out", default=None, help="default: benchmarks/latest[-<mode>].json")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and args.synthetic is None:
        args.synthetic = "qwen3_5_2b"
    sizes = QUICK if args.quick else FULL
    mode = ("synthetic-" + args.synthetic if args.synthetic else "embedded") + (
        "-quick" if args.quick else ""
    )
    out = Path(args.out) if args.out else BENCH_DIR / (
        "latest.json" if mode == "embedded" else f"latest-{mode}.json"
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="abliterate-bench-"))
    began = time.perf_counter()

    def note(text: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {text}", flush=True)

    report: dict[str, Any] = {"mode": mode, "machine": machine(), "sizes": asdict(sizes)}
    try:
        if args.synthetic:
            results = run_synthetic(args, sizes, workdir, note)
        else:
            results = run_embedded(args, sizes, workdir, note)
        figures = headline(results)
        report.update(
            results=results,
            figures=figures,
            verdicts=verdicts(figures),
            notes=(NOTES_SYNTHETIC if args.synthetic else NOTES) + diagnose(results, figures),
            duration_s=time.perf_counter() - began,
        )
        report.update({key: figures[key] for key in TARGETS})  # the top-level keys
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_report(report)
        print(f"\nwrote {out} in {report['duration_s']:.0f} s (work directory {workdir})")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
