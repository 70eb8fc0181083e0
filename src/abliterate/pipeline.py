"""One extraction-plus-abliteration trial, stage by stage, as the method section reads.

    1. load the model (reused across the trials of an in-process sweep)
    2. load the six prompt sets
    3. collect residual activations (cached on disk, shared across trials and processes)
    4. extract refusal directions at the tested layer (matched or unmatched contrast)
    5. evaluate the unedited model (cached once per model x prompts x settings)
    6. ablate, evaluate, measure KL and the perturbation, restore the weights exactly (only the
       edited matrices are copied and put back; nothing is reloaded)
    7. geometry of the contrast and of the directions
    8. record: directions.safetensors, completions.jsonl, results.json (last, atomically)

State that outlives a trial (the model, prompt sets, activations, baseline evaluation, directions)
lives in a :class:`Session`; Hydra's in-process multirun calls :func:`run_trial` once per trial in
one process, so a sweep pays for loading and extraction once. A warm trial's unavoidable work is
the ablated model's generation and one teacher-forced KL pass; ``timing_s`` breaks the rest down
(``baseline_evaluation``, ``generation``, ``kl``, ``geometry``, ``records``) so a benchmark can see
what else a trial costs.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from abliterate import activations as activations_stage
from abliterate import directions as directions_stage
from abliterate import evaluation as evaluation_stage
from abliterate import geometry as geometry_stage
from abliterate import provenance, records
from abliterate.ablation import apply_ablation, effective_combine, removed_fraction
from abliterate.architectures import ResidualWriters, get_layer_count, resolve_residual_writers
from abliterate.config import AblationConfig, ConfigError, validate_config
from abliterate.judge import Judge, build_judge
from abliterate.models import LoadedModel, load_model, read_model_config
from abliterate.prompts import PromptSet, load_prompt_set

log = logging.getLogger(__name__)

TRAIN_SETS = ("harmful_train", "matched_train", "unmatched_train")
EVAL_SETS = ("harmful_eval", "matched_eval", "unmatched_eval")


@dataclass
class Session:
    """What an in-process sweep shares between trials."""

    model_key: str | None = None
    loaded: LoadedModel | None = None
    writers: ResidualWriters | None = None
    prompt_sets: dict[str, PromptSet] = field(default_factory=dict)
    activations: dict[str, activations_stage.Activations] = field(default_factory=dict)
    baselines: dict[str, evaluation_stage.BaselineEvaluation] = field(default_factory=dict)
    directions: dict[str, directions_stage.Directions] = field(default_factory=dict)
    judges: dict[str, Judge] = field(default_factory=dict)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def use_model(self, model_cfg: Any, loaded: LoadedModel) -> None:
        """Run this session's trials on a model built in memory (a benchmark's random-init
        model, a notebook's) instead of loading ``model_cfg``; trials must pass the same
        ``model`` config, whose identity is then ``loaded.identity``."""
        self.reset()
        self.loaded = loaded
        self.writers = resolve_residual_writers(loaded.model)
        self.model_key = _key(model_cfg)


SESSION = Session()


def _key(node: Any) -> str:
    container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return provenance.digest(container)


def effective_extraction(cfg: DictConfig) -> DictConfig:
    """The extraction config with its seed resolved: ``extraction.seed`` when set, else the
    trial's top-level ``seed`` (so a sweep over ``seed`` gives real replicates)."""
    seed = cfg.extraction.seed if cfg.extraction.seed is not None else cfg.seed
    return OmegaConf.merge(cfg.extraction, {"seed": int(seed)})  # type: ignore[return-value]


def _timed(timing: dict[str, float], stage: str):
    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - self.start

    return _Timer()


def count_model_layers(model_cfg: Any) -> int:
    """Decoder layers of the configured model, from its config file alone (no weights)."""
    if model_cfg.source == "embedded":
        return int(model_cfg.num_layers)  # its config is only on disk once it is built
    return get_layer_count(read_model_config(model_cfg))


def check_layer(layer: int, num_layers: int) -> None:
    if not -num_layers <= layer < num_layers:
        raise ConfigError(
            f"layer={layer} is outside this model's layers; valid: 0..{num_layers - 1} (or -{num_layers}..-1)"
        )


def _load_model_stage(cfg: DictConfig, session: Session) -> LoadedModel:
    key = _key(cfg.model)
    if session.loaded is None or session.model_key != key:
        session.reset()
        session.loaded = load_model(cfg.model, cfg.paths.cache_dir)
        session.writers = resolve_residual_writers(session.loaded.model)
        session.model_key = key
    return session.loaded


def _load_prompt_sets(cfg: DictConfig, session: Session) -> dict[str, PromptSet]:
    categories = list(cfg.data.categories) or None
    sets = {}
    for name in (*TRAIN_SETS, *EVAL_SETS):
        key = f"{name}:{_key(cfg.data[name])}:{categories}"
        if key not in session.prompt_sets:
            session.prompt_sets[key] = load_prompt_set(name, cfg.data[name], categories)
        sets[name] = session.prompt_sets[key]
    overlap = set(sets["harmful_train"].prompts) & set(sets["harmful_eval"].prompts)
    if overlap:
        raise ConfigError(
            f"data.harmful_eval shares {len(overlap)} prompts with data.harmful_train "
            f"(e.g. {next(iter(overlap))!r}); evaluation prompts must be held out"
        )
    if cfg.baseline.name == "matched":
        missing = sorted(
            set(sets["harmful_train"].category_names())
            - set(sets["matched_train"].category_names())
        )
        if missing or not sets["harmful_train"].category_names():
            raise ConfigError(
                f"baseline=matched needs matched prompts for every harm category; missing {missing or 'categories'}"
                f" (matched categories: {sets['matched_train'].category_names()})"
            )
    return sets


def _collect(
    cfg: DictConfig, session: Session, loaded: LoadedModel, prompt_set: PromptSet
) -> activations_stage.Activations:
    key = f"{prompt_set.fingerprint()}:{cfg.extraction.position}"
    if key in session.activations:
        cached = session.activations[key]
        return activations_stage.Activations(cached.prompt_set, cached.values, cache_hit=True)
    result = activations_stage.collect_activations(
        loaded, prompt_set, cfg.extraction.position, loaded.batch_size, cfg.paths.cache_dir
    )
    session.activations[key] = result
    return result


def _judge_stage(cfg: DictConfig, session: Session, loaded: LoadedModel) -> Judge:
    """The configured judge, built once per session (a judge model loads once per sweep)."""
    key = _key(cfg.judge)
    if key not in session.judges:
        session.judges[key] = build_judge(cfg.judge, cache_dir=cfg.paths.cache_dir)
    return session.judges[key]


def _held_out_activations(
    baseline: evaluation_stage.BaselineEvaluation, layer: int
) -> geometry_stage.HeldOutActivations | None:
    """The unedited evaluation's harmful and matched activations at ``layer``, with its labels."""
    harmful, matched = baseline.sets["harmful"], baseline.sets["matched"]
    if harmful.activations is None or matched.activations is None:
        return None
    return geometry_stage.HeldOutActivations(
        harmful.activations[:, layer],
        [c or "" for c in harmful.categories],
        harmful.labels,
        matched.activations[:, layer],
        [c or "" for c in matched.categories],
        matched.labels,
    )


def _completion_rows(
    sets: dict[str, evaluation_stage.SetResult], baseline: evaluation_stage.BaselineEvaluation
) -> list[dict]:
    rows = []
    for name, result in sets.items():
        base = baseline.sets[name]
        for i, prompt in enumerate(result.prompts):
            rows.append(
                {
                    "set": name,
                    "index": i,
                    "prompt": prompt,
                    "category": result.categories[i],
                    "response": result.responses[i],
                    "label": result.labels[i],
                    "baseline_response": base.responses[i],
                    "baseline_label": base.labels[i],
                }
            )
    return rows


def run_trial(
    cfg: DictConfig, output_dir: str | Path | None = None, session: Session = SESSION
) -> dict[str, Any]:
    """Run one trial and write its records into ``output_dir``.

    Returns:
        The results dictionary (as written to results.json).
    """
    validate_config(cfg)
    output_dir = Path(output_dir or cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_hash = provenance.config_hash(cfg)
    existing, stale = records.find_reusable_results(
        output_dir, config_hash, provenance.code_version()
    )
    if existing is not None and not cfg.force:
        log.info("%s is complete; skipping (force=true reruns it)", output_dir)
        return existing
    if stale is not None:
        print(
            f"{output_dir}: {stale}; rerunning (the old results kept as "
            f"{records.RESULTS_FILE}.superseded)",
            flush=True,
        )
    if existing is not None or stale is not None:
        # a rerun that dies midway must not leave the old "complete" beside new files
        records.retire_results(output_dir)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)

    # 1-2. model and prompt sets; the layer (from the model's config file), the prompt sets and
    # the evaluation's sizes are checked before any weights load
    with _timed(timing, "load"):
        if session.model_key != _key(cfg.model):
            check_layer(cfg.layer, count_model_layers(cfg.model))
        sets = _load_prompt_sets(cfg, session)
        eval_prompts = evaluation_stage.select_eval_prompts(
            sets["harmful_eval"], sets["unmatched_eval"], sets["matched_eval"], cfg.eval
        )
        loaded = _load_model_stage(cfg, session)
        writers = session.writers
        assert writers is not None
        num_layers = writers.num_layers
        check_layer(cfg.layer, num_layers)
        layer = cfg.layer % num_layers

    # 3. activations
    with _timed(timing, "activations"):
        acts = {name: _collect(cfg, session, loaded, sets[name]) for name in TRAIN_SETS}
        cache_state = "hit" if all(a.cache_hit for a in acts.values()) else "miss"
    harmful = acts["harmful_train"]
    harmful_layer = harmful.values[:, layer]  # (n_harmful, d_model)
    harmful_categories = [c or "" for c in harmful.prompt_set.categories]
    unmatched_mean = acts["unmatched_train"].mean(layer)  # (d_model,) float64
    matched_means = {c or "": m for c, m in acts["matched_train"].category_means(layer).items()}

    # 4. directions (memoised on everything they depend on: the model is the session's)
    extraction = effective_extraction(cfg)
    with _timed(timing, "directions"):
        direction_key = provenance.digest(
            {
                "extraction": _key(extraction),
                "baseline": cfg.baseline.name,
                "layer": layer,
                "prompts": [acts[name].prompt_set.fingerprint() for name in TRAIN_SETS],
            }
        )
        if direction_key not in session.directions:
            session.directions[direction_key] = directions_stage.extract_directions(
                harmful_layer,
                harmful_categories,
                cfg.baseline.name,
                unmatched_mean,
                matched_means,
                extraction,
                layer,
            )
        directions = session.directions[direction_key]
    mean_norm = float(
        torch.cat([harmful_layer, acts["unmatched_train"].values[:, layer]])
        .norm(dim=-1)
        .double()
        .mean()
    )
    scales = None
    # combine=auto: merged for directions as extracted, subspace after SVD (ablation.py says why)
    # a DictConfig with AblationConfig's fields stands in for it (read by attribute only)
    ablation = cast(
        AblationConfig,
        OmegaConf.merge(
            cfg.ablation,
            {"combine": effective_combine(cfg.ablation, cfg.extraction.orthogonalize)},
        ),
    )
    if cfg.ablation.direction_norm == "relative" and len(directions.vectors):
        scales = torch.tensor(
            directions_stage.relative_scales(directions, mean_norm), dtype=torch.float32
        )

    # 5. the unedited model's evaluation (cached)
    # (its generation also records the harmful prompts' activations, for the perturbation ratio)
    position = cfg.extraction.position
    with _timed(timing, "evaluation"), _timed(timing, "baseline_evaluation"):
        judge = _judge_stage(cfg, session, loaded)
        baseline_key = evaluation_stage.baseline_eval_key(
            loaded, eval_prompts, cfg.eval, position, judge
        )
        baseline_memo_hit = baseline_key in session.baselines
        if not baseline_memo_hit:
            session.baselines[baseline_key] = evaluation_stage.evaluate_baseline(
                loaded, eval_prompts, cfg.eval, cfg.paths.cache_dir, position, judge
            )
        baseline = session.baselines[baseline_key]

    # 6. ablate, evaluate, restore (the edit is undone bit-exactly when the block exits); the
    # harmful set's generation also returns its activations, so the perturbation ratio needs no
    # forward pass of its own
    harmful_eval_acts = None
    if len(directions.vectors):
        begin = time.perf_counter()
        with ExitStack() as stack:
            stack.enter_context(
                apply_ablation(loaded.model, writers, directions.vectors, layer, ablation, scales)
            )
            edited = time.perf_counter()
            sets_result = evaluation_stage.evaluate_responses(
                loaded, eval_prompts, cfg.eval, position, timing, judge
            )
            generated = time.perf_counter()
            kl = evaluation_stage.compute_kl(loaded, baseline.kl_reference)
            evaluated = time.perf_counter()
            harmful_eval_acts = sets_result["harmful"].activations
        timing["ablation"] = (edited - begin) + (time.perf_counter() - evaluated)
        timing["kl"] = evaluated - generated
        timing["evaluation"] += evaluated - edited
    else:
        log.warning("no usable direction at layer %d: the ablated model is the original", layer)
        sets_result, kl = baseline.sets, 0.0
    original_eval_acts = baseline.harmful_activations

    # 7. geometry, with its null baselines and the share of each direction the edit removes
    geometry_start = time.perf_counter()
    train = geometry_stage.LayerActivations(
        harmful_layer,
        harmful_categories,
        acts["matched_train"].values[:, layer],
        [c or "" for c in acts["matched_train"].prompt_set.categories],
        acts["unmatched_train"].values[:, layer],
    )
    geometry = geometry_stage.compute_trial_geometry(
        train,
        directions.vectors,
        seed=int(cfg.seed),
        held_out=_held_out_activations(baseline, layer),
        perturbation_ratio=geometry_stage.compute_perturbation_ratio(
            original_eval_acts, harmful_eval_acts, layer
        )
        if harmful_eval_acts is not None and original_eval_acts is not None
        else 0.0,
    )
    geometry["removed_fraction"] = (
        removed_fraction(directions.vectors, ablation, scales) if len(directions.vectors) else []
    )
    geometry["mean_activation_norm"] = mean_norm
    timing["geometry"] = time.perf_counter() - geometry_start

    # 8. records
    records_start = time.perf_counter()
    results = {
        "trial": {
            "model": cfg.model.path,
            "model_name": cfg.model.name,
            "baseline": cfg.baseline.name,
            "extraction": cfg.extraction.method,
            "orthogonalize": cfg.extraction.orthogonalize,
            "layer": layer,
            "weight": float(cfg.ablation.weight),
            "scope": cfg.ablation.scope,
            "combine": ablation.combine,
            "combine_configured": cfg.ablation.combine,
            "direction_norm": cfg.ablation.direction_norm,
            "norm_preserving": bool(cfg.ablation.norm_preserving),
            "embeddings": bool(cfg.ablation.embeddings),
            "mode": cfg.ablation.mode,
            "num_layers": num_layers,
            "seed": int(cfg.seed),
            "extraction_seed": int(extraction.seed),
            "judge": judge.name,
        },
        "directions": {
            "count": len(directions.vectors),
            "norms": list(directions.norms),
            "degenerate": directions.degenerate,
            "labels": list(directions.labels),
            "win_counts": directions.win_counts,
            "relative_scales": scales.tolist() if scales is not None else None,
        },
        "baseline_eval": baseline.rates(),
        "eval": evaluation_stage.summarize_evaluation(sets_result, kl, baseline, cfg.eval),
        "geometry": geometry,
        "cache": {
            "activations": cache_state,
            "baseline_eval": "hit" if baseline_memo_hit or baseline.cache_hit else "miss",
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance.provenance_record(cfg, loaded.batch_size),
    }
    directions_stage.save_directions(
        output_dir / records.DIRECTIONS_FILE,
        directions,
        {
            "model": cfg.model.path,
            "baseline": cfg.baseline.name,
            "extraction": cfg.extraction.method,
        },
    )
    records.write_completions(output_dir, _completion_rows(sets_result, baseline))
    if cfg.export:
        from abliterate.export import export_model

        # hooks cannot be saved; as `ablation` above, a DictConfig stands in for AblationConfig
        weights_mode = cast(AblationConfig, OmegaConf.merge(ablation, {"mode": "weights"}))
        with apply_ablation(loaded.model, writers, directions.vectors, layer, weights_mode, scales):
            export_model(loaded, output_dir / "model", results)
    for stage in (
        "load", "activations", "directions", "ablation", "evaluation", "baseline_evaluation",
        "generation", "judge", "kl",
    ):  # fmt: skip
        timing.setdefault(stage, 0.0)
    timing["records"] = time.perf_counter() - records_start  # results.json itself not included
    timing["total"] = time.perf_counter() - start
    results["timing_s"] = timing
    records.write_results(output_dir, results)
    return results


def select_objective(results: dict[str, Any], dotted: str) -> float:
    """A number from results by dotted key (``eval.kl_divergence``); null (NaN on disk) is NaN."""
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"objectives entry {dotted!r} is not a key of results.json")
        node = node[part]
    return float("nan") if node is None else float(node)


def main(cfg: DictConfig) -> float | list[float]:
    """The Hydra task: run a trial, print its summary, return its ``objectives`` (by default the
    harmful refusal rate, the value an optimizing sweeper minimizes; several for multi-objective).

    Tracking starts before the trial (W&B sees its duration and whether it failed), logs only
    after results.json is written, and ends in ``finally``; a W&B failure is a warning.
    """
    from abliterate import tracking

    validate_config(cfg)  # a typo fails before a W&B run is started for it
    output_dir = Path(cfg.paths.output_dir)
    reusable, _ = records.find_reusable_results(
        output_dir, provenance.config_hash(cfg), provenance.code_version()
    )
    skipped = reusable is not None and not cfg.force
    tracker = tracking.Tracker() if skipped else tracking.start_tracking(cfg, output_dir)
    exit_code = 1
    try:
        results = run_trial(cfg, output_dir)
        print(records.format_summary(results), flush=True)
        tracker.log_trial(output_dir)
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    values = [select_objective(results, key) for key in cfg.objectives]
    return values[0] if len(values) == 1 else values
