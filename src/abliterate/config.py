"""Typed schemas behind the YAML config groups.

Each dataclass is registered in Hydra's ConfigStore as the base of its group, so a typo in a key
or a value of the wrong type fails at compose time. A field with a fixed set of values is typed
with a ``Choice`` enum, so a bad value fails at compose time too, in one line that names the key,
the bad value and the valid ones (``report_choice_errors_in_one_line``). Numeric ranges and the
checks that span several fields are ``validate_config``'s, here and nowhere downstream.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from abliterate.choices import (  # noqa: F401  (re-exported: the stages import them from here)
    Choice,
    ChoiceT,
    ConfigError,
    Dtype,
    ModelSource,
    RecipeName,
    choice_error_line,
    choice_message,
    parse_choice,
)
from abliterate.judge.config import JudgeConfig

HARM_CATEGORIES: tuple[str, ...] = (
    "sexual_content",
    "violence_weapons",
    "hacking_cybersecurity",
    "self_harm",
    "drugs_substances",
    "fraud_deception",
    "harassment",
    "surveillance_privacy",
    "misc_harmful",
)


class Baseline(Choice):
    matched = "matched"  # per-category topic-matched harmless mean
    unmatched = "unmatched"  # one generic harmless mean


class ExtractionMethod(Choice):
    som_per_class = "som_per_class"
    som_global = "som_global"
    diff_in_means = "diff_in_means"


class Position(Choice):
    last = "last"  # the last prompt token
    mean_post_instruction = "mean_post_instruction"  # mean over the template tokens after it


class Topology(Choice):
    hexagonal = "hexagonal"
    rectangular = "rectangular"


class Neighborhood(Choice):
    gaussian = "gaussian"
    mexican_hat = "mexican_hat"
    bubble = "bubble"
    triangle = "triangle"


class Orthogonalize(Choice):
    none = "none"
    svd = "svd"


class Scope(Choice):
    all = "all"  # every layer's writers
    layer = "layer"  # only the tested layer's writers


class Combine(Choice):
    """How k directions become one edit (abliterate.ablation's docstring has the maths)."""

    merged = "merged"
    sum = "sum"
    sequential = "sequential"
    subspace = "subspace"
    principal = "principal"  # the first principal axis of the directions, one rank-1 edit
    auto = "auto"  # merged, or subspace after extraction.orthogonalize=svd


class DirectionNorm(Choice):
    unit = "unit"
    relative = "relative"  # |d| / mean activation norm at the layer


class AblationMode(Choice):
    weights = "weights"  # edit the matrices in place, restored after
    hooks = "hooks"  # the same map at inference time


class LoggerName(Choice):
    wandb = "wandb"
    none = "none"


class LoggerMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class PromptSource(Choice):
    builtin = "builtin"
    hub = "hub"
    file = "file"


class BuiltinPromptSet(Choice):
    """The ``path`` of a builtin prompt set (a hub or file set's path is free text)."""

    harmful = "harmful"
    matched = "matched"
    unmatched = "unmatched"


class BuiltinSplit(Choice):
    """The ``split`` of a builtin prompt set, in the order abliterate.prompts cuts them."""

    refuser_train = "refuser_train"
    extraction = "extraction"
    evaluation = "evaluation"


class Categorize(Choice):
    none = "none"
    keywords = "keywords"  # the documented keyword rules of abliterate.categorize


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in paths and reports
    source: ModelSource = ModelSource.hub  # hub (repo id or local dir) | gguf | embedded
    path: str = MISSING  # repo id, local directory, or .gguf file path
    gguf_file: str | None = None  # file name inside `path` when source=gguf and path is a directory
    dtype: Dtype = Dtype.float32  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    # a model larger than one device: auto | balanced | sequential (accelerate spreads the layers
    # over the visible GPUs, then the CPU) or one device; null: the whole model on `device`
    device_map: str | None = None
    trust_remote_code: bool = False  # only run a model's own Python code when asked to
    allow_pickle: bool = False  # load .bin (pickle) checkpoints; default: safetensors only
    revision: str | None = None  # hub revision (branch, tag or commit)
    disable_thinking: bool = True  # pass enable_thinking=False to chat templates that support it
    system_prompt: str | None = None  # None keeps the template's own default system prompt
    num_layers: int | None = None  # informative; the value read from the model config is used
    default_layer: int = MISSING  # the layer a plain `python run.py` uses for this model
    # source=embedded: the refuser recipe built and used (v9 ... v16, the named recipes
    # of `python -m abliterate.refuser build --recipe`); null: the current default (v16)
    recipe: RecipeName | None = None
    batch_size: int = (
        16  # prompts per forward pass for activations and evaluation; 0: chosen for the device
    )


@dataclass
class PromptSetConfig:
    source: PromptSource = PromptSource.builtin  # builtin | hub | file
    path: str | None = None  # builtin: harmful | matched | unmatched; hub: dataset id; file: path
    split: str | None = None  # builtin: refuser_train | extraction | evaluation; hub: dataset split
    column: str = "prompt"  # column / JSON key holding the prompt text
    category_column: str | None = None  # column holding the harm category (None: no categories)
    limit: int | None = None  # keep at most this many prompts (stratified by category)
    per_category: int | None = None  # keep at most this many prompts of each category
    skip_per_category: int = 0  # drop the first N of each category (hold them out for another set)
    config_name: str | None = None  # hub: the dataset's config (subset), e.g. behaviors for JBB
    # keywords: with category_column null, assign the nine harm categories by the documented
    # keyword rules of abliterate.categorize (misc_harmful when none matches); none: no categories
    categorize: Categorize = Categorize.none


@dataclass
class DataConfig:
    harmful_train: PromptSetConfig = field(default_factory=PromptSetConfig)
    matched_train: PromptSetConfig = field(default_factory=PromptSetConfig)
    unmatched_train: PromptSetConfig = field(default_factory=PromptSetConfig)
    harmful_eval: PromptSetConfig = field(default_factory=PromptSetConfig)
    matched_eval: PromptSetConfig = field(default_factory=PromptSetConfig)
    unmatched_eval: PromptSetConfig = field(default_factory=PromptSetConfig)
    # harm categories kept in every categorised set (builtin, hub or file; a hub or file set
    # loses the others with one warning, and none left is an error); []: each set's own
    categories: list[str] = field(default_factory=lambda: list(HARM_CATEGORIES))


@dataclass
class BaselineConfig:
    # matched (per-category topic-matched mean) | unmatched (one generic mean)
    name: Baseline = Baseline.unmatched


@dataclass
class ExtractionConfig:
    method: ExtractionMethod = ExtractionMethod.som_per_class  # | som_global | diff_in_means
    # last (last prompt token) | mean_post_instruction (mean over template tokens after the
    # instruction)
    position: Position = Position.last
    som_rows: int = 3  # SOM grid rows
    som_cols: int = 3  # SOM grid columns
    sigma: float = 0.4  # neighbourhood radius, in grid units
    learning_rate: float = 0.01
    iterations: int = 10000  # MiniSom train_random iterations
    topology: Topology = Topology.hexagonal  # hexagonal | rectangular
    neighborhood: Neighborhood = Neighborhood.gaussian  # | mexican_hat | bubble | triangle
    top_k: int | None = None  # som_global / svd: keep at most k directions (None: all)
    orthogonalize: Orthogonalize = Orthogonalize.none  # none | svd
    seed: int | None = None  # SOM initialisation and sample order; None: the trial's top-level seed


@dataclass
class AblationConfig:
    weight: float = 1.0  # w in W <- W - w r (r^T W); 1 projects out exactly, >1 over-projects
    scope: Scope = Scope.all  # all (every layer's writers) | layer (only the tested layer's)
    # how k directions become one edit, a Combine; auto: merged, or subspace after
    # extraction.orthogonalize=svd (merging k orthonormal axes removes only 1/k of each)
    combine: Combine = Combine.auto
    direction_norm: DirectionNorm = DirectionNorm.unit  # unit | relative (|d| / mean act. norm)
    norm_preserving: bool = False  # rescale each written vector back to its original norm
    embeddings: bool = False  # also project the direction out of the token embeddings
    mode: AblationMode = AblationMode.weights  # weights (in place, restored after) | hooks


@dataclass
class EvalConfig:
    harmful_per_category: int = 4  # held-out harmful prompts per category
    n_harmful: int | None = None  # then at most this many in all, round-robin over categories
    n_unmatched: int = 24  # held-out generic harmless prompts (false refusals)
    n_matched: int = 18  # held-out topic-matched harmless prompts (false refusals)
    max_new_tokens: int = 64  # greedy response length (README: Generation length)
    kl_prompts: int = 24  # harmless prompts for KL(original || ablated)
    kl_tokens: int = (
        1  # teacher-forced tokens of the original greedy continuation (1 = first token)
    )
    # None: full vocabulary; k >= 1: the original's top-k tokens + a tail bucket (k at or above
    # the vocabulary: the full vocabulary; 0 is refused: the tail bucket alone gives KL = 0)
    kl_top_k: int | None = None
    kl_floor: float = 1e-3  # efficiency = removed refusals / max(KL, floor)
    early_stop: bool = True  # stop a row once it ended or the judge says its label is decided


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none  # wandb | none (results.json is written either way)
    project: str = "abliterate"  # W&B project
    entity: str | None = None  # W&B team or user; None: the account's default entity
    mode: LoggerMode = LoggerMode.offline  # offline (local, `wandb sync` later) | online | disabled
    group: str | None = None  # None: the sweep's directory (multirun) or the run directory
    tags: list[str] = field(default_factory=list)  # W&B run tags
    job_type: str = "trial"  # W&B job type
    init_timeout_s: float = 20.0  # seconds wandb.init may take before falling back (W&B: 90)
    finish_timeout_s: float = 120.0  # seconds run.finish may spend uploading (0: no limit)
    completions_sample: int = (
        48  # unused (kept so older configs compose): every completion is logged
    )


@dataclass
class PathsConfig:
    cache_dir: str = "${oc.env:ABLITERATE_CACHE,${oc.env:HOME}/.cache/abliterate}"
    output_dir: str = "${hydra:runtime.output_dir}"
    # seconds a job waits for a cache lock before failing with the lock's holder named;
    # null: $ABLITERATE_LOCK_TIMEOUT, else 1800
    lock_timeout_s: float | None = None


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    layer: int = -1  # 0-based decoder layer whose directions are used; negative counts from the end
    seed: int = (
        0  # drives every random choice (SOM initialisation and order) unless a stage sets its own
    )
    export: bool = False  # save the abliterated model (safetensors + tokenizer + card)
    force: bool = False  # rerun even if this trial's results.json is complete
    # dotted results.json keys the task returns, in order (two or more: a multi-objective sweeper)
    objectives: list[str] = field(default_factory=lambda: ["eval.refusal_rate"])
    extra: dict[str, Any] = field(default_factory=dict)


PROMPT_SETS: tuple[str, ...] = (
    "harmful_train", "matched_train", "unmatched_train", "harmful_eval", "matched_eval",
    "unmatched_eval",
)  # fmt: skip


def choice_fields(node: type = TrialConfig, prefix: str = "") -> dict[str, type[Choice]]:
    """Every choice field of the schema, by dotted key (``ablation.combine``: ``Combine``)."""
    import dataclasses
    import typing

    fields: dict[str, type[Choice]] = {}
    for name, hint in typing.get_type_hints(node).items():
        if isinstance(hint, type) and issubclass(hint, Choice):
            fields[f"{prefix}{name}"] = hint
        elif dataclasses.is_dataclass(hint):
            fields.update(choice_fields(hint, f"{prefix}{name}."))  # type: ignore[arg-type]
    return fields


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def validate_config(cfg: Any) -> None:
    """Check option values before anything expensive runs.

    Args:
        cfg: a composed TrialConfig (DictConfig or dataclass instance).

    Raises:
        ConfigError: naming the key, the bad value and the valid values.
    """
    _check_numbers(cfg)
    _validate_judge(cfg)
    _validate_objectives(_get(cfg, "objectives"))
    _check_logger(cfg)
    for name in PROMPT_SETS:
        _check_prompt_set(cfg, name)
    _check_categories(cfg)
    _check_recipe(cfg)


def _check_recipe(cfg: Any) -> None:
    """``model.recipe`` names how the embedded refuser is built; another source has no recipe."""
    try:
        recipe, source = _get(cfg, "model.recipe"), _get(cfg, "model.source")
    except (KeyError, AttributeError):
        return  # a config built by hand without the field: the default recipe
    if recipe is not None and source != ModelSource.embedded:
        raise ConfigError(
            f"model.recipe={str(recipe)!r} applies only to model.source=embedded (here "
            f"model.source={str(source)!r}); leave it null"
        )


def _check_numbers(cfg: Any) -> None:
    """The numeric ranges of the extraction, ablation, evaluation and model settings."""
    weight = _get(cfg, "ablation.weight")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"ablation.weight={weight!r} must be a finite number >= 0")
    for key in ("extraction.som_rows", "extraction.som_cols", "extraction.iterations"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 1")
    top_k = _get(cfg, "extraction.top_k")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"extraction.top_k={top_k!r} must be >= 1 or null")
    kl_top_k = _get(cfg, "eval.kl_top_k")
    if kl_top_k is not None and kl_top_k < 1:
        # k = 0 would keep only the tail bucket, whose mass is 1 under both models: KL exactly 0
        raise ConfigError(
            f"eval.kl_top_k={kl_top_k!r} must be >= 1 (the original's top-k tokens plus a tail "
            "bucket), or null (the full vocabulary)"
        )
    if _get(cfg, "eval.kl_tokens") < 1:
        raise ConfigError(f"eval.kl_tokens={_get(cfg, 'eval.kl_tokens')!r} must be >= 1")
    if _get(cfg, "model.batch_size") < 0:
        raise ConfigError(
            f"model.batch_size={_get(cfg, 'model.batch_size')!r} must be >= 1, or 0 (chosen for "
            "the device)"
        )
    for key in ("eval.harmful_per_category", "eval.max_new_tokens", "eval.kl_prompts"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 1")
    n_harmful = _get(cfg, "eval.n_harmful")
    if n_harmful is not None and n_harmful < 1:
        raise ConfigError(f"eval.n_harmful={n_harmful!r} must be >= 1 or null")
    for key in ("eval.n_unmatched", "eval.n_matched"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for key in ("extraction.sigma", "extraction.learning_rate", "eval.kl_floor"):
        value = _get(cfg, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a finite number > 0")


def _check_logger(cfg: Any) -> None:
    for key in ("logger.init_timeout_s", "logger.finish_timeout_s"):
        value = _get(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key}={value!r} must be a finite number >= 0")


def _check_prompt_set(cfg: Any, name: str) -> None:
    """One prompt set's source, path, split, sizes and categorisation."""
    source = _get(cfg, f"data.{name}.source")
    path = _get(cfg, f"data.{name}.path")
    if source == PromptSource.builtin and path not in set(BuiltinPromptSet):
        raise ConfigError(
            f"data.{name}.path={path!r} is not a builtin prompt set; choose one of "
            f"{', '.join(BuiltinPromptSet)}"
        )
    split = _get(cfg, f"data.{name}.split")
    if source == PromptSource.builtin and split is not None and split not in set(BuiltinSplit):
        raise ConfigError(
            f"data.{name}.split={split!r} is not a builtin split; choose one of "
            f"{', '.join(BuiltinSplit)} or null"
        )
    if source in ("hub", "file") and not path:
        raise ConfigError(f"data.{name}.path is required when data.{name}.source={source}")
    if source == "file" and not Path(path).expanduser().is_file():
        raise ConfigError(f"data.{name}.path={path!r}: no such file")
    for key in ("limit", "per_category"):
        value = _get(cfg, f"data.{name}.{key}")
        if value is not None and value < 1:
            raise ConfigError(f"data.{name}.{key}={value!r} must be >= 1 or null")
    categorize = _get(cfg, f"data.{name}.categorize")
    if categorize != "none" and _get(cfg, f"data.{name}.category_column") is not None:
        raise ConfigError(
            f"data.{name}.categorize={categorize} assigns categories only to a set without "
            f"them; set data.{name}.category_column=null or data.{name}.categorize=none"
        )
    if _get(cfg, f"data.{name}.skip_per_category") < 0:
        raise ConfigError(
            f"data.{name}.skip_per_category={_get(cfg, f'data.{name}.skip_per_category')!r}"
            " must be >= 0"
        )


def _check_categories(cfg: Any) -> None:
    unknown = sorted(set(_get(cfg, "data.categories")) - set(HARM_CATEGORIES))
    if unknown and _get(cfg, "data.harmful_train.source") == "builtin":
        raise ConfigError(
            f"data.categories has unknown categories {unknown}; the builtin corpus has "
            f"{', '.join(HARM_CATEGORIES)}"
        )


# The judge's numeric settings (judge.<key> >= 1); validate_judge_config checks its names.
JUDGE_COUNTS: tuple[str, ...] = ("batch_size", "max_length", "max_new_tokens", "max_response_chars")


def _validate_judge(cfg: Any) -> None:
    """The judge config, checked here (before any weights load) rather than when it is built."""
    from abliterate.judge.config import validate_judge_config

    judge = _get(cfg, "judge")
    try:
        validate_judge_config(judge)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key in JUDGE_COUNTS:
        value = _get(judge, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"judge.{key}={value!r} must be a whole number >= 1")
    name, model, source = _get(judge, "name"), _get(judge, "model"), _get(judge, "source")
    if name == "classifier" and not model:
        raise ConfigError("judge=classifier needs judge.model=<hub id or local folder>")
    if name == "llm" and source != "embedded" and not model:
        raise ConfigError("judge=llm needs judge.model=<hub id or dir> or judge.source=embedded")


# What `objectives` may name: the numeric scalars of results.json (docs/results-contract.md).
# tests/test_reliability.py checks that a real trial's results.json holds every one of them.
_OUTCOME_NAMES: tuple[str, ...] = ("REFUSE", "EVASIVE", "COMPLY", "INCOHERENT")
OBJECTIVE_KEYS: tuple[str, ...] = (
    *(
        f"eval.{key}"
        for key in (
            "n_harmful", "n_harmless", "n_matched", "n_kl_prompts", "refusals",
            "baseline_refusals", "refusal_rate", "evasive_rate", "comply_rate",
            "incoherent_rate", "harmless_refusals", "harmless_refusal_rate",
            "harmless_evasive_rate", "matched_harmless_refusals",
            "matched_harmless_refusal_rate", "refusals_removed", "kl_divergence", "efficiency",
        )
    ),
    *(f"eval.outcomes.{outcome}" for outcome in _OUTCOME_NAMES),
    *(f"eval.harmless_outcomes.{outcome}" for outcome in _OUTCOME_NAMES),
    *(f"eval.matched_outcomes.{outcome}" for outcome in _OUTCOME_NAMES),
    *(
        f"baseline_eval.{key}"
        for key in (
            "n_harmful", "refusal_rate", "n_harmless", "harmless_refusal_rate", "n_matched",
            "matched_harmless_refusal_rate",
        )
    ),
    *(f"baseline_eval.outcomes.{outcome}" for outcome in _OUTCOME_NAMES),
    "directions.count",
    "directions.degenerate",
    *(
        f"geometry.{key}"
        for key in (
            "norm_ratio_matched_to_unmatched", "cos_matched_unmatched", "cos_topic_unmatched",
            "capture", "perturbation_ratio", "mean_activation_norm", "behavioural_capture",
        )
    ),
    *(
        f"timing_s.{key}"
        for key in (
            "load", "activations", "directions", "baseline_evaluation", "ablation",
            "generation", "judge", "kl", "evaluation", "geometry", "records", "total",
        )
    ),
)  # fmt: skip


def _validate_objectives(objectives: Any) -> None:
    """Every ``objectives`` entry names a number of results.json, checked before the trial runs
    (a typo used to surface only after the whole trial, when the value was looked up)."""
    if not objectives:
        raise ConfigError(
            "objectives=[] names no value; give at least one results.json key, e.g. "
            "objectives=[eval.refusal_rate]"
        )
    for entry in objectives:
        if entry not in OBJECTIVE_KEYS:
            close = difflib.get_close_matches(str(entry), OBJECTIVE_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"objectives entry {entry!r} is not a number of results.json{hint}; valid: "
                f"{', '.join(OBJECTIVE_KEYS)}"
            )


# Trial directory names (hydra.sweep.subdir). A file-system path component holds at most 255
# bytes; longer names keep this many bytes and end with a hash of the whole name.
DIRNAME_MAX_BYTES = 200
DIRNAME_HASH_CHARS = 16


def safe_dirname(name: str) -> str:
    """``name`` as one directory name: never a nested or parent path, at most DIRNAME_MAX_BYTES.

    ``%`` and every character a path cannot hold as one component (``/``, ``\\``, control
    characters) are percent-encoded, and so are the dots of ``..``, so distinct names stay
    distinct (``model.path=org/name`` becomes ``model.path=org%2Fname``, never ``org_name``).
    A name longer than the limit is cut and suffixed with ``~`` and a hash of the whole name.
    """
    encoded = "".join(
        f"%{ord(char):02X}" if char in "%/\\" or ord(char) < 32 or ord(char) == 127 else char
        for char in name
    )
    encoded = encoded.replace("..", "%2E%2E")
    if encoded == ".":
        encoded = "%2E"
    raw = encoded.encode()
    if len(raw) <= DIRNAME_MAX_BYTES:
        return encoded
    digest = hashlib.sha256(name.encode()).hexdigest()[:DIRNAME_HASH_CHARS]
    head = raw[: DIRNAME_MAX_BYTES - DIRNAME_HASH_CHARS - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def _excluded(key: str, exclude_keys: set[str]) -> bool:
    return any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in exclude_keys)


def trial_dirname(overrides: Any, exclude_keys: Any = ()) -> str:
    """A trial's directory name from its command-line overrides (``hydra.overrides.task``).

    As Hydra's ``hydra.job.override_dirname`` (sorted ``key=value`` joined by ``,``), except that
    an excluded key also excludes every key below it (``logger`` drops ``logger=none``,
    ``logger.tags=[x]`` and ``logger.mode=online``), and the name is made safe by
    ``safe_dirname``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    excluded = {str(key) for key in exclude_keys or ()}
    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or ()])
    lines = sorted(
        f"{override.get_key_element()}={override.get_value_element_as_str()}"
        for override in parsed
        if not _excluded(override.key_or_group, excluded)
    )
    return safe_dirname(",".join(lines))


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/config.yaml uses (``abliterate.trial_dirname``,
    ``abliterate.safe_dirname``). Also run on import, so a job unpickled in another process (the
    submitit launchers) resolves its directory the same way."""
    OmegaConf.register_new_resolver("abliterate.trial_dirname", trial_dirname, replace=True)
    OmegaConf.register_new_resolver(
        "abliterate.safe_dirname", lambda name: safe_dirname(str(name)), replace=True
    )


register_resolvers()


def report_choice_errors_in_one_line() -> None:
    """Make the command line report a bad choice value as ``error: <key>=<value> is not valid;
    choose one of ...``, the line a ``ConfigError`` gets, instead of Hydra's five.

    Hydra prints a compose error as its own line plus the OmegaConf cause's several lines
    (full_key, reference_type, object_type) and has no hook to shorten them: its error reporter
    (``hydra._internal.utils.run_and_report``, which wraps composition, run and multirun) is
    wrapped so that such an error reaches it as a compact one-line exception. Other errors pass
    through unchanged. Idempotent.
    """
    from hydra._internal import utils as hydra_utils
    from hydra.errors import CompactHydraException, ConfigCompositionException

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "_choice_errors", False):
        return  # a Hydra without it keeps its own (longer) message

    def run_and_report(func: Any) -> Any:
        def translated() -> Any:
            try:
                return func()
            except ConfigCompositionException as error:
                line = choice_error_line(error)
                if line is None:
                    raise
                raise CompactHydraException(f"error: {line}") from None

        return report(translated)

    run_and_report._choice_errors = True  # type: ignore[attr-defined]
    hydra_utils.run_and_report = run_and_report


def register_configs() -> None:
    """Register the schemas so YAML files can extend them (``defaults: [/model_schema]``).

    They are stored without a group: a schema stored in a group would be listed as one of its
    choices in ``python run.py --help`` (``model: hub, model_schema, ...``)."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    for group, node in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("baseline", BaselineConfig),
        ("extraction", ExtractionConfig),
        ("ablation", AblationConfig),
        ("eval", EvalConfig),
        ("judge", JudgeConfig),
        ("logger", LoggerConfig),
        ("paths", PathsConfig),
    ):
        cs.store(name=f"{group}_schema", node=node)
