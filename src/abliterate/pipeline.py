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

State that outlives a trial (the model, prompt sets, activations, unedited evaluation, directions)
lives in a :class:`Session`; Hydra's in-process multirun calls :func:`run_trial` once per trial in
one process, so a sweep pays for loading and extraction once. A warm trial's unavoidable work is
the ablated model's generation and one teacher-forced KL pass; ``timing_s`` breaks the rest down
(``baseline_evaluation``, ``generation``, ``kl``, ``geometry``, ``records``) so a benchmark can see
what else a trial costs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
from abliterate.loading import load_model
from abliterate.models import (
    LoadedModel,
    PromptLengthCheck,
    check_architecture,
    check_chat_template,
    check_prompt_lengths,
    context_length,
    read_model_config,
    read_tokenizer,
)
from abliterate.prompts import PromptSet, check_overlaps, load_prompt_set

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
    # unedited_eval_key -> the unedited model's evaluation
    unedited_evaluations: dict[str, evaluation_stage.UneditedEvaluation] = field(
        default_factory=dict
    )
    directions: dict[str, directions_stage.Directions] = field(default_factory=dict)
    judges: dict[str, Judge] = field(default_factory=dict)
    # trial config digest -> the checked prompt sets and evaluation prompts (check_inputs)
    checked: dict[str, tuple[dict[str, PromptSet], Any]] = field(default_factory=dict)
    contrasts: dict[str, dict[str, Any]] = field(default_factory=dict)  # geometry's contrast block

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


class _Stage:
    note = ""  # what the stage's log line adds (cache hit or miss, counts)


class StageTimer:
    """The one timer of a trial's stages: ``with timer.stage("activations"):`` adds the block's
    wall time to ``timing["activations"]`` (and to ``also``, a stage that contains it) and logs
    one INFO line with the stage's note; :meth:`finish` fills the stages that did not run (0.0)
    and the total."""

    STAGES = (
        "load", "activations", "directions", "ablation", "evaluation", "baseline_evaluation",
        "generation", "judge", "kl",
    )  # fmt: skip

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.timing[stage] = self.timing.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str, also: str | None = None) -> Iterator[_Stage]:
        state = _Stage()
        begin = time.perf_counter()
        yield state
        seconds = time.perf_counter() - begin
        self.add(name, seconds)
        if also is not None:
            self.add(also, seconds)
        log.info("%s: %.1f s%s", name, seconds, f" ({state.note})" if state.note else "")

    def finish(self) -> dict[str, float]:
        for stage in self.STAGES:
            self.timing.setdefault(stage, 0.0)
        self.timing["total"] = time.perf_counter() - self.start
        return self.timing


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
    unedited: evaluation_stage.UneditedEvaluation, layer: int
) -> geometry_stage.HeldOutActivations | None:
    """The unedited evaluation's harmful and matched activations at ``layer``, with its labels."""
    harmful, matched = unedited.sets["harmful"], unedited.sets["matched"]
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
    sets: dict[str, evaluation_stage.SetResult], unedited: evaluation_stage.UneditedEvaluation
) -> list[dict]:
    rows = []
    for name, result in sets.items():
        before = unedited.sets[name]
        for i, prompt in enumerate(result.prompts):
            rows.append(
                {
                    "set": name,
                    "index": i,
                    "prompt": prompt,
                    "category": result.categories[i],
                    "response": result.responses[i],
                    "label": result.labels[i],
                    # the unedited model's; completions.jsonl keeps the baseline_ field names
                    "baseline_response": before.responses[i],
                    "baseline_label": before.labels[i],
                }
            )
    return rows


@dataclass
class TrialInputs:
    """Stages 1-2: the prompt sets, the evaluation's prompts, the model and the tested layer."""

    sets: dict[str, PromptSet]
    eval_prompts: evaluation_stage.EvalPrompts
    loaded: LoadedModel
    writers: ResidualWriters
    layer: int  # 0-based
    num_layers: int


@dataclass
class TrainActivations:
    """Stage 3: the training sets' activations, and the tested layer's rows as geometry reads them."""

    sets: dict[str, activations_stage.Activations]
    layer: geometry_stage.LayerActivations
    cache_state: str  # "hit" when every set came from a cache

    def unmatched_mean(self, layer: int) -> torch.Tensor:
        return self.sets["unmatched_train"].mean(layer)  # (d_model,) float64

    def matched_means(self, layer: int) -> dict[str, torch.Tensor]:
        means = self.sets["matched_train"].category_means(layer)
        return {c or "": m for c, m in means.items()}


@dataclass
class EditSettings:
    """How the directions are applied: the ablation config with ``combine`` resolved, the
    per-direction scales of ``direction_norm=relative`` and the mean activation norm."""

    ablation: AblationConfig
    scales: torch.Tensor | None
    mean_norm: float


@dataclass
class EditedEvaluation:
    """Stage 6: the edited model's labelled responses, its KL to the unedited model, and the
    harmful set's activations during generation (for the perturbation ratio)."""

    sets: dict[str, evaluation_stage.SetResult]
    kl: float
    harmful_activations: torch.Tensor | None


def _resume(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """A finished trial's results when they can stand (same config hash and code version);
    otherwise the old results are retired (kept as ``.superseded`` when stale) and None."""
    existing, stale = records.find_reusable_results(
        output_dir, provenance.config_hash(cfg), provenance.code_version()
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
    return None


def _length_checks(
    cfg: DictConfig, sets: dict[str, PromptSet], chosen: evaluation_stage.EvalPrompts
) -> list[PromptLengthCheck]:
    """What must fit the model's context: each training prompt alone (its activations), each
    evaluated prompt with eval.max_new_tokens after it, each KL prompt with eval.kl_tokens."""
    checks = [PromptLengthCheck(f"data.{name}", sets[name].prompts) for name in TRAIN_SETS]
    evaluated = (("harmful", chosen.harmful), ("matched", chosen.matched))
    for kind, selected in (*evaluated, ("unmatched", chosen.unmatched)):
        checks.append(
            PromptLengthCheck(
                f"data.{kind}_eval",
                selected.prompts,
                new_tokens=int(cfg.eval.max_new_tokens),
                new_tokens_key="eval.max_new_tokens",
                indexed_in=sets[f"{kind}_eval"].prompts,
            )
        )
    checks.append(
        PromptLengthCheck(
            "data.unmatched_eval",
            chosen.kl.prompts,
            new_tokens=int(cfg.eval.kl_tokens),
            new_tokens_key="eval.kl_tokens",
            indexed_in=sets["unmatched_eval"].prompts,
        )
    )
    return checks


def check_inputs(
    cfg: DictConfig, session: Session
) -> tuple[dict[str, PromptSet], evaluation_stage.EvalPrompts]:
    """Everything about a trial that can be checked before its model's weights load, in one
    place (``main`` runs it before a W&B run starts, ``run_trial`` before loading):

    the config values; the model's config.json (or GGUF metadata): that it exists, its class
    against the residual-writer registry, the layer against its layer count; its tokenizer's
    chat template; the prompt sets (files, categories, matched coverage), the evaluation's sizes,
    the prompts shared between training and evaluation sets (and the embedded model's own
    fine-tuning split), and every prompt's length against the model's context.

    The embedded model's config and tokenizer exist only once it is built: its prompt lengths are
    checked by ``_inputs_stage`` right after it loads.

    Raises:
        ConfigError, PromptDataError: one line naming the key or file, the value and what is valid.
    """
    validate_config(cfg)
    key = _key(cfg)
    if key in session.checked:
        return session.checked[key]
    tokenizer, context = None, None
    if session.model_key == _key(cfg.model) and session.loaded is not None:
        tokenizer = session.loaded.tokenizer
        context = context_length(session.loaded.model.config)
    elif cfg.model.source == "embedded":
        check_layer(cfg.layer, count_model_layers(cfg.model))
    else:
        config = read_model_config(cfg.model)
        check_architecture(config, cfg.model)
        check_layer(cfg.layer, get_layer_count(config))
        tokenizer = read_tokenizer(cfg.model)
        assert tokenizer is not None
        check_chat_template(tokenizer, cfg.model.path)
        context = context_length(config)
    sets = _load_prompt_sets(cfg, session)
    chosen = evaluation_stage.select_eval_prompts(
        sets["harmful_eval"], sets["unmatched_eval"], sets["matched_eval"], cfg.eval
    )
    check_overlaps(
        {name: sets[name] for name in TRAIN_SETS},
        {
            "harmful_eval": chosen.harmful,
            "matched_eval": chosen.matched,
            "unmatched_eval": PromptSet(
                "unmatched_eval", chosen.unmatched.prompts + chosen.kl.prompts
            ),
        },
        embedded=cfg.model.source == "embedded",
    )
    if tokenizer is not None:
        check_prompt_lengths(
            tokenizer,
            context,
            _length_checks(cfg, sets, chosen),
            cfg.model.system_prompt,
            cfg.model.disable_thinking,
        )
    session.checked[key] = (sets, chosen)
    return sets, chosen


def _inputs_stage(cfg: DictConfig, session: Session) -> TrialInputs:
    """1-2. Prompt sets and model: ``check_inputs`` first, so nothing loads before the model's
    config, the layer, the prompt sets and the evaluation's sizes are checked."""
    unchecked_lengths = session.model_key != _key(cfg.model) and cfg.model.source == "embedded"
    sets, eval_prompts = check_inputs(cfg, session)
    loaded = _load_model_stage(cfg, session)
    if unchecked_lengths:  # the embedded model's tokenizer exists only once it is built
        check_prompt_lengths(
            loaded.tokenizer,
            context_length(loaded.model.config),
            _length_checks(cfg, sets, eval_prompts),
            cfg.model.system_prompt,
            cfg.model.disable_thinking,
        )
    writers = session.writers
    assert writers is not None
    check_layer(cfg.layer, writers.num_layers)
    return TrialInputs(
        sets, eval_prompts, loaded, writers, cfg.layer % writers.num_layers, writers.num_layers
    )


def _activations_stage(cfg: DictConfig, session: Session, inputs: TrialInputs) -> TrainActivations:
    """3. Residual activations of the three training sets (cached on disk and in the session)."""
    acts = {name: _collect(cfg, session, inputs.loaded, inputs.sets[name]) for name in TRAIN_SETS}
    layer = inputs.layer
    harmful, matched = acts["harmful_train"], acts["matched_train"]
    rows = geometry_stage.LayerActivations(
        harmful.values[:, layer],  # (n_harmful, d_model)
        [c or "" for c in harmful.prompt_set.categories],
        matched.values[:, layer],
        [c or "" for c in matched.prompt_set.categories],
        acts["unmatched_train"].values[:, layer],
    )
    cache_state = "hit" if all(a.cache_hit for a in acts.values()) else "miss"
    return TrainActivations(acts, rows, cache_state)


def _directions_stage(
    cfg: DictConfig, session: Session, train: TrainActivations, layer: int
) -> directions_stage.Directions:
    """4. Refusal directions at the tested layer, memoised on everything they depend on (the
    resolved extraction config, the baseline, the layer, the three training sets; the model is
    the session's)."""
    extraction = effective_extraction(cfg)
    key = provenance.digest(
        {
            "extraction": _key(extraction),
            "baseline": cfg.baseline.name,
            "layer": layer,
            "prompts": [train.sets[name].prompt_set.fingerprint() for name in TRAIN_SETS],
        }
    )
    if key not in session.directions:
        session.directions[key] = directions_stage.extract_directions(
            train.layer.harmful,
            train.layer.harmful_categories,
            cfg.baseline.name,
            train.unmatched_mean(layer),
            train.matched_means(layer),
            extraction,
            layer,
        )
    return session.directions[key]


def _edit_settings(
    cfg: DictConfig, directions: directions_stage.Directions, train: TrainActivations
) -> EditSettings:
    """The ablation as it is applied: combine=auto resolved (merged for directions as extracted,
    subspace after SVD; ablation.py says why) and the relative scales when asked for."""
    rows = train.layer
    mean_norm = float(torch.cat([rows.harmful, rows.unmatched]).norm(dim=-1).double().mean())
    # a DictConfig with AblationConfig's fields stands in for it (read by attribute only)
    ablation = cast(
        AblationConfig,
        OmegaConf.merge(
            cfg.ablation,
            {"combine": effective_combine(cfg.ablation, cfg.extraction.orthogonalize)},
        ),
    )
    scales = None
    if cfg.ablation.direction_norm == "relative" and len(directions.vectors):
        scales = torch.tensor(
            directions_stage.relative_scales(directions, mean_norm), dtype=torch.float32
        )
    return EditSettings(ablation, scales, mean_norm)


def _unedited_stage(
    cfg: DictConfig, session: Session, inputs: TrialInputs, judge: Judge
) -> tuple[evaluation_stage.UneditedEvaluation, bool]:
    """5. The unedited model's evaluation (cached on disk and in the session; its generation
    also records the harmful and matched prompts' activations). Returns it and whether the
    session's memo had it."""
    position = cfg.extraction.position
    key = evaluation_stage.unedited_eval_key(
        inputs.loaded, inputs.eval_prompts, cfg.eval, position, judge
    )
    memo_hit = key in session.unedited_evaluations
    if not memo_hit:
        session.unedited_evaluations[key] = evaluation_stage.evaluate_unedited(
            inputs.loaded, inputs.eval_prompts, cfg.eval, cfg.paths.cache_dir, position, judge
        )
    return session.unedited_evaluations[key], memo_hit


def _edited_stage(
    cfg: DictConfig,
    inputs: TrialInputs,
    directions: directions_stage.Directions,
    edit: EditSettings,
    unedited: evaluation_stage.UneditedEvaluation,
    judge: Judge,
    timer: StageTimer,
) -> EditedEvaluation:
    """6. Ablate, evaluate, measure KL, restore (the edit is undone bit-exactly when the block
    exits). The harmful set's generation also returns its activations, so the perturbation
    ratio needs no forward pass of its own."""
    if not len(directions.vectors):
        log.warning(
            "no usable direction at layer %d: the ablated model is the original", inputs.layer
        )
        return EditedEvaluation(unedited.sets, 0.0, None)
    loaded = inputs.loaded
    begin = time.perf_counter()
    with apply_ablation(
        loaded.model, inputs.writers, directions.vectors, inputs.layer, edit.ablation, edit.scales
    ):
        edited = time.perf_counter()
        sets = evaluation_stage.evaluate_responses(
            loaded, inputs.eval_prompts, cfg.eval, cfg.extraction.position, timer.timing, judge
        )
        generated = time.perf_counter()
        kl = evaluation_stage.compute_kl(loaded, unedited.kl_reference)
        evaluated = time.perf_counter()
    timer.add("ablation", (edited - begin) + (time.perf_counter() - evaluated))
    timer.add("kl", evaluated - generated)
    timer.add("evaluation", evaluated - edited)
    log.info("edited evaluation: %.1f s (KL %.1f s)", evaluated - edited, evaluated - generated)
    return EditedEvaluation(sets, kl, sets["harmful"].activations)


def _geometry_stage(
    cfg: DictConfig,
    session: Session,
    train: TrainActivations,
    directions: directions_stage.Directions,
    edit: EditSettings,
    unedited: evaluation_stage.UneditedEvaluation,
    edited: EditedEvaluation,
    layer: int,
) -> dict[str, Any]:
    """7. Geometry, with its null baselines and the share of each direction the edit removes."""
    original = unedited.harmful_activations
    perturbation = (
        geometry_stage.compute_perturbation_ratio(original, edited.harmful_activations, layer)
        if edited.harmful_activations is not None and original is not None
        else 0.0
    )
    # the contrast statistics and their nulls depend on the training rows and the seed only
    contrast_key = provenance.digest(
        {
            "layer": layer,
            "position": cfg.extraction.position,
            "seed": int(cfg.seed),
            "prompts": [train.sets[name].prompt_set.fingerprint() for name in TRAIN_SETS],
        }
    )
    if contrast_key not in session.contrasts:
        session.contrasts[contrast_key] = geometry_stage.compute_contrast_block(
            train.layer, seed=int(cfg.seed)
        )
    geometry = geometry_stage.compute_trial_geometry(
        train.layer,
        directions.vectors,
        seed=int(cfg.seed),
        held_out=_held_out_activations(unedited, layer),
        perturbation_ratio=perturbation,
        # a copy: each trial's results own their geometry block
        contrast=copy.deepcopy(session.contrasts[contrast_key]),
    )
    geometry["removed_fraction"] = (
        removed_fraction(directions.vectors, edit.ablation, edit.scales)
        if len(directions.vectors)
        else []
    )
    geometry["mean_activation_norm"] = edit.mean_norm
    return geometry


def _export_stage(inputs: TrialInputs, output_dir: Path, results: dict[str, Any]) -> None:
    """``export=true``: the edit rebuilt from the records just written (directions.safetensors
    and the results), applied to the weights and saved as ``model/`` under the trial: the code
    path of ``python -m abliterate.export`` (hooks cannot be saved; they compute the same)."""
    from abliterate.export import export_trial

    export_trial(
        output_dir,
        output_dir / "model",
        overwrite=True,
        results=results,
        loaded=inputs.loaded,
        writers=inputs.writers,
    )


def run_trial(
    cfg: DictConfig, output_dir: str | Path | None = None, session: Session = SESSION
) -> dict[str, Any]:
    """Run one trial, stage by stage as the module docstring lists them, and write its records
    into ``output_dir``.

    Returns:
        The results dictionary (as written to results.json).
    """
    validate_config(cfg)
    output_dir = Path(output_dir or cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    finished = _resume(cfg, output_dir)
    if finished is not None:
        return finished
    timer = StageTimer()
    torch.manual_seed(cfg.seed)
    with timer.stage("load"):
        inputs = _inputs_stage(cfg, session)
    layer = inputs.layer
    with timer.stage("activations") as stage:
        train = _activations_stage(cfg, session, inputs)
        stage.note = f"cache {train.cache_state}"
    with timer.stage("directions") as stage:
        directions = _directions_stage(cfg, session, train, layer)
        stage.note = f"{directions.count} directions at layer {layer}"
    if cfg.export and not len(directions.vectors):
        # before the evaluation: a relaunch fails here again, not after a whole evaluation
        raise ConfigError(
            f"export=true but every direction at layer {layer} is degenerate "
            f"({directions.degenerate} dropped, none left): the exported model would be the "
            "original; set export=false, or choose another layer, baseline or extraction"
        )
    edit = _edit_settings(cfg, directions, train)
    # recorded as timing_s.baseline_evaluation, cache.baseline_eval, baseline_eval (the contract)
    with timer.stage("baseline_evaluation", also="evaluation") as stage:
        judge = _judge_stage(cfg, session, inputs.loaded)
        unedited, memo_hit = _unedited_stage(cfg, session, inputs, judge)
        unedited_cache = "hit" if memo_hit or unedited.cache_hit else "miss"
        stage.note = f"cache {unedited_cache}"
    edited = _edited_stage(cfg, inputs, directions, edit, unedited, judge, timer)
    with timer.stage("geometry"):
        geometry = _geometry_stage(cfg, session, train, directions, edit, unedited, edited, layer)
    with timer.stage("records"):  # results.json itself not included
        results = records.build_results(
            cfg,
            layer=layer,
            num_layers=inputs.num_layers,
            combine=edit.ablation.combine,
            extraction_seed=int(effective_extraction(cfg).seed),
            judge=judge.name,
            directions=directions.as_record(
                edit.scales.tolist() if edit.scales is not None else None
            ),
            unedited_eval=unedited.rates(),
            evaluation=evaluation_stage.summarize_evaluation(
                edited.sets, edited.kl, unedited, cfg.eval
            ),
            geometry=geometry,
            cache={"activations": train.cache_state, "baseline_eval": unedited_cache},
            provenance=provenance.provenance_record(
                cfg, inputs.loaded.batch_size, inputs.loaded.identity
            ),
        )
        directions_stage.save_directions(
            output_dir / records.DIRECTIONS_FILE,
            directions,
            {
                "model": cfg.model.path,
                "baseline": cfg.baseline.name,
                "extraction": cfg.extraction.method,
            },
        )
        records.write_completions(output_dir, _completion_rows(edited.sets, unedited))
        if cfg.export:
            _export_stage(inputs, output_dir, results)
    results["timing_s"] = timer.finish()
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


def _write_trial_figures(results: dict[str, Any], output_dir: Path) -> None:
    """The trial's own figures into ``<trial>/plots/`` (abliterate.plots); never costs the trial."""
    from abliterate.plots import write_trial_figures

    try:
        write_trial_figures(results, output_dir)
    except Exception as error:
        log.warning("trial figures not drawn (%s: %s)", type(error).__name__, error)


def main(cfg: DictConfig) -> float | list[float]:
    """The Hydra task: run a trial, print its summary, return its ``objectives`` (by default the
    harmful refusal rate, the value an optimizing sweeper minimizes; several for multi-objective).

    Tracking starts before the trial (W&B sees its duration and whether it failed), logs only
    after results.json is written, and ends in ``finally``; a W&B failure is a warning.
    """
    from contextlib import ExitStack

    from hydra.errors import CompactHydraException

    from abliterate import cache, tracking

    validate_config(cfg)  # a typo fails before a W&B run is started for it
    cache.configure(cfg.paths)  # the lock timeout; locks work in paths.cache_dir (before loading)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as trial_lock:
        # one run of a trial at a time, whichever launch or job asks: a trial that another live
        # process is running is not waited for (that can take the whole trial) but skipped here,
        # as a failure of this launch; the relaunch after that job ends reads its result back
        lock_path = output_dir / ".trial.lock"
        try:
            trial_lock.enter_context(
                cache.file_lock(lock_path, timeout_s=0, what=f"trial {output_dir}")
            )
        except cache.LockTimeout:
            holder = cache.read_holder(lock_path)
            raise CompactHydraException(
                f"error: {output_dir} is being run by "
                f"{holder.describe() if holder else 'another process'} (lock {lock_path}); not "
                "run here: relaunch after that job ends (if that job is gone, delete the lock)"
            ) from None
        reusable, _ = records.find_reusable_results(
            output_dir, provenance.config_hash(cfg), provenance.code_version()
        )
        skipped = reusable is not None and not cfg.force
        if not skipped:
            # the model's config and tokenizer, the layer, the prompt sets and their lengths are
            # checked before a W&B run is started for the trial: a mistake leaves no failed run
            check_inputs(cfg, SESSION)
        tracker = tracking.Tracker() if skipped else tracking.start_tracking(cfg, output_dir)
        exit_code = 1
        try:
            results = run_trial(cfg, output_dir)
            # logged, so the summary is also in the trial's log file (Hydra's console handler prints it)
            log.info("summary of %s\n%s", output_dir, records.format_summary(results))
            if not skipped:
                _write_trial_figures(results, output_dir)
            tracker.log_trial(output_dir)
            exit_code = 0
        finally:
            tracker.finish(exit_code)
    values = [select_objective(results, key) for key in cfg.objectives]
    return values[0] if len(values) == 1 else values
