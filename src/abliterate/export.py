"""From a finished trial to a usable model: the edit rebuilt from the trial's records, saved so
``from_pretrained`` loads it, with a Hugging Face model card, and optionally pushed to the hub.

    python -m abliterate.export TRIAL_DIR [--out DIR] [--overwrite] [--push-to-hub REPO]

Nothing is re-extracted: the directions are read from the trial's directions.safetensors, the
edit's settings from its results.json (the ``trial`` block: layer, combine as applied; the
resolved ``config``: the ablation options and the model; the ``directions`` block: the relative
scales). The edit is always made on the weights (``W <- M W``, :mod:`abliterate.ablation`), the
form that can be saved; hooks mode computes the same function. ``export=true`` in a trial and
``python -m abliterate.chat TRIAL_DIR`` go through the same functions (:func:`read_trial_edit`,
:func:`applied_edit`), so the exported model, the chat and the trial's own evaluation see one
edit.

The folder holds the weights (safetensors), the tokenizer, the generation config, README.md (the
model card: YAML front matter with ``base_model`` and tags; the trial's settings; its measured
outcomes with counts and Wilson intervals) and abliteration_card.json (the same facts for
programs, plus the chat settings :mod:`abliterate.chat` reads back).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from abliterate import records
from abliterate.ablation import AblationError, apply_weight_ablation, effective_combine
from abliterate.architectures import ResidualWriters, resolve_residual_writers
from abliterate.config import AblationConfig, ConfigError
from abliterate.directions import load_directions
from abliterate.loading import load_model
from abliterate.models import LoadedModel
from abliterate.provenance import model_identity, recorded_recipe
from abliterate.stats import wilson_interval

CARD_FILE = "abliteration_card.json"
README_FILE = "README.md"
OUTCOMES = ("REFUSE", "EVASIVE", "COMPLY", "INCOHERENT")


class ExportError(ValueError):
    """A trial directory or export target that cannot be used; the message is one line."""


@dataclass(frozen=True)
class TrialEdit:
    """Everything needed to redo a trial's edit on its model, read from its records.

    Attributes:
        trial_dir: the trial's directory.
        results: its results.json (or the in-memory results of a trial being written).
        config: its resolved config.
        directions: (k, d_model) float32 directions, as the trial applied them.
        layer: the 0-based layer they were extracted at (and, for scope=layer, edit).
        ablation: the ablation options with ``combine`` resolved and ``mode=weights``.
        scales: (k,) float32 relative scales for ``direction_norm=relative``, else None.
    """

    trial_dir: Path
    results: dict[str, Any]
    config: DictConfig
    directions: torch.Tensor
    layer: int
    ablation: AblationConfig
    scales: torch.Tensor | None


def read_trial_edit(trial_dir: str | Path, results: dict[str, Any] | None = None) -> TrialEdit:
    """Read a finished trial's edit: directions, layer, ablation options and scales.

    Args:
        trial_dir: the trial's directory (results.json, directions.safetensors).
        results: the trial's results when they are not on disk yet (``export=true`` exports
            before results.json is written); read from results.json when None.

    Raises:
        ExportError: no such directory, no complete results.json, no directions file, or no
            usable direction (all degenerate: the edited model would be the original).
    """
    trial_dir = Path(trial_dir)
    if not trial_dir.is_dir():
        raise ExportError(f"{trial_dir} is not a directory; give a trial's output directory")
    if results is not None:
        # as records.write_results will write them
        results = {"schema_version": records.SCHEMA_VERSION, "status": "complete", **results}
    else:
        path = trial_dir / records.RESULTS_FILE
        if not path.is_file():
            raise ExportError(
                f"{trial_dir} has no {records.RESULTS_FILE}: not a trial directory, or the "
                "trial has not finished"
            )
        try:
            results = json.loads(path.read_text())
        except ValueError as error:
            raise ExportError(f"{path} is not valid JSON ({error})") from None
        if results.get("status") != "complete":
            raise ExportError(
                f"{path} has status={results.get('status')!r}; only a complete trial can be "
                "exported (rerun it)"
            )
    config = _trial_config(trial_dir, results)
    directions_path = trial_dir / records.DIRECTIONS_FILE
    if not directions_path.is_file():
        raise ExportError(
            f"{trial_dir} has no {records.DIRECTIONS_FILE}; the edit cannot be rebuilt"
        )
    try:
        directions = load_directions(directions_path)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"{directions_path} cannot be read: {error}") from None
    trial = results.get("trial") or {}
    layer = int(trial.get("layer", directions.layer))
    if directions.count == 0:
        raise ExportError(
            f"{trial_dir}: all {directions.degenerate} directions at layer {layer} were "
            "degenerate (zero norm), so the edited model is the original; nothing to export"
        )
    if directions.layer != layer:
        raise ExportError(
            f"{directions_path} holds layer {directions.layer} but results.json says layer "
            f"{layer}; the trial's records disagree"
        )
    recorded_count = (results.get("directions") or {}).get("count")
    if recorded_count is not None and recorded_count != directions.count:
        raise ExportError(
            f"{directions_path} holds {directions.count} directions but results.json says "
            f"{recorded_count}; the trial's records disagree"
        )
    combine = trial.get("combine")  # the combination applied (auto resolved); schema 1: absent
    if combine is None or combine == "auto":
        combine = effective_combine(config.ablation, config.extraction.orthogonalize)
    # a DictConfig with AblationConfig's fields stands in for it (read by attribute only)
    ablation = cast(
        AblationConfig, OmegaConf.merge(config.ablation, {"combine": combine, "mode": "weights"})
    )
    scales = None
    if ablation.direction_norm == "relative":
        recorded = (results.get("directions") or {}).get("relative_scales")
        if not recorded or len(recorded) != directions.count:
            raise ExportError(
                f"{trial_dir}: ablation.direction_norm=relative but results.json records no "
                "relative_scales for its directions"
            )
        scales = torch.tensor(recorded, dtype=torch.float32)  # as the trial passed them
    return TrialEdit(trial_dir, results, config, directions.vectors, layer, ablation, scales)


def _trial_config(trial_dir: Path, results: dict[str, Any]) -> DictConfig:
    """The trial's resolved config: results.json's ``config``, else Hydra's .hydra/config.yaml."""
    if isinstance(results.get("config"), dict):
        config = OmegaConf.create(results["config"])
    elif (trial_dir / ".hydra" / "config.yaml").is_file():
        config = OmegaConf.load(trial_dir / ".hydra" / "config.yaml")
    else:
        raise ExportError(
            f"{trial_dir}: results.json has no config and there is no .hydra/config.yaml"
        )
    if not isinstance(config, DictConfig) or not all(
        key in config for key in ("model", "ablation", "extraction")
    ):
        raise ExportError(f"{trial_dir}: the trial's config lacks model, ablation or extraction")
    return config


def load_trial_model(
    edit: TrialEdit,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    check_identity: bool = True,
) -> tuple[LoadedModel, ResidualWriters]:
    """Load the trial's (unedited) model as the trial did, from its ``model`` config, and check
    that its weights are the ones the trial edited.

    results.json records ``provenance.model_identity`` (the hub commit, or a local folder's or
    file's signature). An embedded trial loads the recorded folder itself, so a later build of
    the embedded model (a new recipe) is never taken for the trial's. A trial made before the
    identity was recorded is loaded from its config with a warning.

    Args:
        edit: from :func:`read_trial_edit`.
        device: overrides ``model.device`` (e.g. ``cpu`` to export a GPU trial on a laptop).
        cache_dir: overrides ``paths.cache_dir`` (where the embedded model is built).
        check_identity: refuse weights other than the recorded ones (else a warning).

    Raises:
        ExportError: the model cannot be loaded (its path is gone, the hub is offline...), or
            its weights are not the trial's.
    """
    model_cfg = edit.config.model
    if device is not None:
        # one device: a trial's model.device_map (which places the layers itself, ignoring
        # model.device) would otherwise put the model on the GPUs whatever --device says
        model_cfg = OmegaConf.merge(model_cfg, {"device": device, "device_map": None})
    recorded = (edit.results.get("provenance") or {}).get("model_identity")
    if recorded is None and model_cfg.source == "embedded":
        # the build the trial ran on: v9 for a config without model.recipe, the default then for
        # a null one (provenance.recorded_recipe), not today's default
        container = OmegaConf.to_container(edit.config, resolve=True)
        recipe = recorded_recipe({**edit.results, "config": container})
        model_cfg = OmegaConf.merge(model_cfg, {"recipe": recipe})
    if recorded is None:
        print(
            f"warning: {edit.trial_dir}: results.json records no model identity (an older "
            f"trial); the weights now at model.path={model_cfg.path} are taken to be the trial's",
            file=sys.stderr,
        )
    elif model_cfg.source == "embedded":
        directory = Path(recorded.split(":", 1)[1].rsplit(":", 1)[0])
        if not directory.is_dir():
            raise ExportError(
                f"the trial's embedded model {directory} is no longer in the cache; rebuild that "
                "version or rerun the trial"
            )
        model_cfg = OmegaConf.merge(model_cfg, {"source": "hub", "path": str(directory)})
    local = Path(str(model_cfg.path)).expanduser()
    commit = _recorded_hub_commit(recorded)
    if commit is not None and not local.exists():
        # the exact commit the trial edited, not whatever the repo's branch points at now
        model_cfg = OmegaConf.merge(model_cfg, {"revision": commit})
    if recorded is not None and model_cfg.source != "embedded" and local.exists():
        # a local folder or file is identified without loading it: refuse before the weights
        now = model_identity(model_cfg.source, local)
        _check_identity(recorded, now, model_cfg.path, check_identity)
    cache = cache_dir or OmegaConf.select(edit.config, "paths.cache_dir") or "."
    try:
        loaded = load_model(model_cfg, cache)
    except ConfigError:
        raise
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ExportError(
            f"the trial's model (model.path={model_cfg.path}) cannot be loaded: {first_line}"
        ) from None
    if recorded is not None and not local.exists():
        _check_identity(recorded, loaded.identity, model_cfg.path, check_identity)
    return loaded, resolve_residual_writers(loaded.model)


def _recorded_hub_commit(recorded: str | None) -> str | None:
    """The hub commit in a recorded ``hub:<repo>@<commit>`` identity (None if unresolved)."""
    if not recorded or not recorded.startswith("hub:") or recorded.endswith(":unresolved"):
        return None
    return recorded.rsplit("@", 1)[1]


def _check_identity(recorded: str, now: str, path: Any, strict: bool) -> None:
    if _weights_of(now) == _weights_of(recorded):
        return
    message = (
        f"the model at model.path={path} is not the one the trial edited (identity then "
        f"{recorded}, now {now})"
    )
    if strict:
        raise ExportError(f"{message}; pass --any-weights to use it anyway")
    print(f"warning: {message}", file=sys.stderr)


def _weights_of(identity: str) -> str:
    """A model identity without its source prefix (``embedded-dir:`` and ``hub-dir:`` name the
    same folder the same way)."""
    kind, _, rest = identity.partition(":")
    return f"dir:{rest}" if kind.endswith("-dir") else identity


@contextlib.contextmanager
def applied_edit(writers: ResidualWriters, edit: TrialEdit) -> Iterator[None]:
    """The trial's edit on the model's weights for the duration of a ``with`` block (restored
    bit-exactly on exit), exactly as the trial made it (:func:`apply_weight_ablation`)."""
    try:
        handle = apply_weight_ablation(
            writers, edit.directions, edit.layer, edit.ablation, edit.scales
        )
    except AblationError as error:
        raise ExportError(f"{edit.trial_dir}: the edit cannot be applied: {error}") from None
    with handle:
        yield


def save_edited_model(loaded: LoadedModel, directory: Path, edit: TrialEdit) -> Path:
    """Save the model as it is now (call inside :func:`applied_edit`): weights, tokenizer,
    generation config, README.md model card and abliteration_card.json."""
    directory.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    text_config = model.config.get_text_config()
    tied_in_config = bool(getattr(text_config, "tie_word_embeddings", False))
    output_embeddings = model.get_output_embeddings()
    untied = (
        output_embeddings is not None
        and output_embeddings.weight is not model.get_input_embeddings().weight
    )
    if tied_in_config and untied:
        # The edit gave the embedding its own (edited) weight while the head kept the original:
        # save both, or loading would tie the head to the edited embedding.
        text_config.tie_word_embeddings = False
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if tied_in_config and untied:
            text_config.tie_word_embeddings = True
    loaded.tokenizer.save_pretrained(directory)
    generation_config = copy.deepcopy(model.generation_config)
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    generation_config.save_pretrained(directory)
    (directory / README_FILE).write_text(model_card(edit.results, edit.config))
    (directory / CARD_FILE).write_text(json.dumps(_card_record(edit), indent=2, default=str))
    return directory


def export_trial(
    trial_dir: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    results: dict[str, Any] | None = None,
    loaded: LoadedModel | None = None,
    writers: ResidualWriters | None = None,
    device: str | None = None,
    check_identity: bool = True,
) -> Path:
    """Rebuild a trial's edit from its records and save the edited model to ``out``.

    The folder is written under a temporary name and renamed into place, so a failure leaves
    nothing at ``out``; the model is restored after saving.

    Args:
        trial_dir: the trial's directory.
        out: the folder to write (default ``TRIAL_DIR/model``).
        overwrite: replace an existing ``out``; otherwise a non-empty ``out`` is an error.
        results: the trial's results when results.json is not written yet (``export=true``).
        loaded, writers: the trial's model already in memory (``export=true``); loaded from the
            trial's config when None.
        device: overrides ``model.device`` when the model is loaded here.
        check_identity: refuse weights other than the trial's (see :func:`load_trial_model`).

    Returns:
        The exported folder.

    Raises:
        ExportError: see :func:`read_trial_edit`; ``out`` exists and is not empty.
    """
    edit = read_trial_edit(trial_dir, results)
    # absolute, so that `--out .` has a name to stage beside
    target = (Path(out) if out is not None else edit.trial_dir / "model").expanduser().resolve()
    trial_resolved = edit.trial_dir.resolve()
    if target == trial_resolved or target in trial_resolved.parents:
        # --overwrite would delete the trial's records (or a whole sweep) to put the model there
        raise ExportError(
            f"--out {target} is the trial directory or contains it; choose a folder outside it "
            "(the default is TRIAL_DIR/model)"
        )
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise ExportError(f"{target} already exists; choose another --out or pass --overwrite")
    if loaded is None:
        loaded, writers = load_trial_model(edit, device, check_identity=check_identity)
    if writers is None:
        writers = resolve_residual_writers(loaded.model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with applied_edit(writers, edit):
            save_edited_model(loaded, staging, edit)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face hub as a model repo; returns its URL.

    A thin call to ``huggingface_hub`` (create the repo if needed, upload the folder as one
    commit); the folder already holds the model card, so the repo page shows it.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload abliterated model (abliterate.export)",
    )
    return str(url)


def check_push_possible(repo_id: str) -> None:
    """Fail before any work when ``--push-to-hub`` cannot succeed: a malformed repo id, the hub
    switched off (HF_HUB_OFFLINE) or no token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a valid repo id ({error})") from None
    if "/" not in repo_id:
        raise ExportError(f"--push-to-hub {repo_id!r}: give it as OWNER/NAME")
    if constants.HF_HUB_OFFLINE:
        raise ExportError(
            f"--push-to-hub {repo_id} needs the network, but HF_HUB_OFFLINE is set; export "
            "without it and upload the folder later (hf upload REPO DIR)"
        )
    if get_token() is None:
        raise ExportError(
            f"--push-to-hub {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN)"
        )


# ---------------------------------------------------------------------------------------------
# The model card


def _is_hub_id(config: DictConfig) -> bool:
    """Whether the trial's model is a hub repo id (a local folder or file is not)."""
    path = str(config.model.path)
    return (
        config.model.source == "hub"
        and not Path(path).expanduser().exists()
        and path.count("/") == 1
        and not path.startswith((".", "/", "~"))
    )


def _count_rate(count: Any, n: Any, rate: Any, interval: Any = None) -> str:
    """``k/n = rate [low, high]`` (the Wilson interval from the counts where the record has none);
    a set that was not evaluated (n = 0 or a null rate) reads 'not evaluated'."""
    if not n or (rate is None and count is None):
        return "not evaluated"
    if count is None:
        count = round(float(rate) * int(n))  # the unedited model's harmless rates carry no count
    if rate is None:
        rate = int(count) / int(n)
    interval = interval or wilson_interval(int(count), int(n))
    text = f"{int(count)}/{int(n)} = {float(rate):.2f}"
    if interval:
        text += f" [{float(interval[0]):.2f}, {float(interval[1]):.2f}]"
    return text


def _outcome_cell(block: dict[str, Any], outcome: str) -> str:
    counts = block.get("outcomes") or {}
    rate_key = "refusal_rate" if outcome == "REFUSE" else f"{outcome.lower()}_rate"
    return _count_rate(
        counts.get(outcome), block.get("n_harmful"), block.get(rate_key),
        block.get(f"{rate_key}_ci95"),
    )  # fmt: skip


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def model_card(results: dict[str, Any], config: DictConfig) -> str:
    """README.md for the exported folder: YAML front matter (``base_model`` when the trial's
    model is a hub id, tags, library) and the trial's settings and measured outcomes."""
    trial = results.get("trial") or {}
    base = str(config.model.path)
    name = trial.get("model_name", config.model.name)
    base_line = (
        f"[`{base}`](https://huggingface.co/{base})"
        if _is_hub_id(config)
        else f"`{base}` (model.source={config.model.source}; a local model, so the card's "
        "metadata has no base_model)"
    )
    settings = _card_settings(trial, results.get("directions") or {}, base, name)
    lines = [
        f"# {name}, abliterated at layer {trial.get('layer')} ({trial.get('baseline')} baseline)",
        "",
        f"This is {base_line} with refusal directions projected out of every residual-stream "
        "writer the trial edited (`W <- W - w r (r^T W)`), made by the abliterate "
        "framework from one trial. The directions were extracted from the model's own "
        "activations; no fine-tuning was done. The measurements below are the trial's, on its "
        "evaluation prompts: they describe this edit on those sets, with the intervals' "
        "uncertainty, and are not a safety evaluation.",
        "",
        "## The edit",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in settings],
        "",
        *_card_measurements(results),
        *_card_use_and_provenance(results),
    ]
    metadata = _card_metadata(trial, config)
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines)


def _card_metadata(trial: dict[str, Any], config: DictConfig) -> Any:
    """The card's YAML front matter: base_model (a hub id only), library, pipeline and tags."""
    from huggingface_hub import ModelCardData

    base = str(config.model.path)
    tags = [
        "abliterated",
        "abliterate",
        "refusal-direction",
        f"baseline-{trial.get('baseline', config.baseline.name)}",
        f"extraction-{trial.get('extraction', config.extraction.method)}",
    ]
    return ModelCardData(
        base_model=base if _is_hub_id(config) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )


def _card_settings(
    trial: dict[str, Any], directions: dict[str, Any], base: str, name: str
) -> list[tuple[str, Any]]:
    """The rows of the card's "The edit" table: (setting, value)."""
    return [
        ("model", f"`{base}` ({name})"),
        ("layer (0-based)", f"{trial.get('layer')} of {trial.get('num_layers', '?')}"),
        ("baseline", trial.get("baseline")),
        ("extraction", f"{trial.get('extraction')}, orthogonalize={trial.get('orthogonalize')}"),
        ("directions", f"{directions.get('count')} ({', '.join(directions.get('labels') or [])}); "
                       f"degenerate dropped: {directions.get('degenerate')}"),
        ("weight", trial.get("weight")),
        ("scope", trial.get("scope")),
        ("combine", f"{trial.get('combine')} (configured: "
                    f"{trial.get('combine_configured', trial.get('combine'))})"),
        ("direction_norm", trial.get("direction_norm")),
        ("norm_preserving", trial.get("norm_preserving")),
        ("embeddings", trial.get("embeddings")),
        ("seed / extraction seed", f"{trial.get('seed')} / {trial.get('extraction_seed')}"),
    ]  # fmt: skip


def _card_measurements(results: dict[str, Any]) -> list[str]:
    """The card's "Measured in the trial" section: outcome and false-refusal counts, rates and
    intervals, edited against unedited, then refusals removed, KL, capture and perturbation."""
    trial = results.get("trial") or {}
    edited = results.get("eval") or {}
    unedited = results.get("baseline_eval") or {}
    geometry = results.get("geometry") or {}
    return [
        f"## Measured in the trial (judge: {trial.get('judge', 'markers')})",
        "",
        "Counts out of the prompts evaluated, the rate, and its Wilson 95% interval. Outcomes of "
        "harmful prompts: REFUSE (declines), EVASIVE (answers without the requested content), "
        "COMPLY (answers coherently), INCOHERENT (broken text). False refusal: a harmless prompt "
        "refused (unmatched: everyday requests; matched: harmless requests on the harm "
        "categories' topics).",
        "",
        "| measure | edited (this model) | unedited |",
        "|---|---|---|",
        *[
            f"| harmful {outcome} | {_outcome_cell(edited, outcome)} | "
            f"{_outcome_cell(unedited, outcome)} |"
            for outcome in OUTCOMES
        ],
        "| false refusal, unmatched harmless | "
        + _count_rate(edited.get("harmless_refusals"), edited.get("n_harmless"),
                      edited.get("harmless_refusal_rate"), edited.get("harmless_refusal_rate_ci95"))
        + " | "
        + _count_rate(None, unedited.get("n_harmless"), unedited.get("harmless_refusal_rate"),
                      unedited.get("harmless_refusal_rate_ci95"))
        + " |",
        "| false refusal, matched harmless | "
        + _count_rate(edited.get("matched_harmless_refusals"), edited.get("n_matched"),
                      edited.get("matched_harmless_refusal_rate"),
                      edited.get("matched_harmless_refusal_rate_ci95"))
        + " | "
        + _count_rate(None, unedited.get("n_matched"),
                      unedited.get("matched_harmless_refusal_rate"),
                      unedited.get("matched_harmless_refusal_rate_ci95"))
        + " |",
        "",
        f"- refusals removed (REFUSE unedited -> COMPLY edited): "
        f"{_number(edited.get('refusals_removed'))} of {_number(edited.get('n_harmful'))}",
        f"- KL(unedited || edited): {_number(edited.get('kl_divergence'))} nats per token "
        f"({_number(edited.get('n_kl_prompts'))} harmless prompts x "
        f"{_number(edited.get('kl_tokens'))} tokens); efficiency "
        f"{_number(edited.get('efficiency'))} (refusals removed per nat)",
        f"- capture {_number(geometry.get('capture'), 3)}, perturbation ratio "
        f"{_number(geometry.get('perturbation_ratio'), 3)}, share of each direction removed "
        f"{[round(float(v), 3) for v in geometry.get('removed_fraction') or []]}",
        "",
    ]  # fmt: skip


def _card_use_and_provenance(results: dict[str, Any]) -> list[str]:
    """The card's "Use" (loading and chat) and "Provenance" (code, config, schema) sections."""
    provenance = results.get("provenance") or {}
    return [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
        "```",
        "",
        "or `python -m abliterate.chat THIS_FOLDER` for a terminal chat.",
        "",
        "## Provenance",
        "",
        f"- code version {provenance.get('code_version', 'n/a')}, commit "
        f"{provenance.get('git_commit') or 'n/a'}, config hash {provenance.get('config_hash', 'n/a')}",
        f"- trial results schema {results.get('schema_version', 'n/a')}; the full record is the "
        "trial's results.json (abliteration_card.json here holds its main blocks)",
        "",
    ]


def _card_record(edit: TrialEdit) -> dict[str, Any]:
    results, model = edit.results, edit.config.model
    return {
        "source_model": model.path,
        "trial_dir": str(edit.trial_dir.resolve()),
        "trial": results.get("trial"),
        "directions": {
            k: (results.get("directions") or {}).get(k)
            for k in ("count", "labels", "degenerate", "relative_scales")
        },
        "eval": {k: v for k, v in (results.get("eval") or {}).items() if k != "refusal_rate_by_category"},
        "baseline_eval": results.get("baseline_eval"),
        "provenance": results.get("provenance"),
        # read back by abliterate.chat: the trial evaluated the model with these
        "chat": {
            "system_prompt": OmegaConf.select(model, "system_prompt"),
            "disable_thinking": bool(OmegaConf.select(model, "disable_thinking", default=True)),
        },
        "note": "Refusal directions were projected out of this model's residual-stream writers by abliterate.",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abliterate.export",
        description="Save a finished trial's edited model as a from_pretrained folder with a "
        "model card (the edit is rebuilt from the trial's directions and settings; nothing is "
        "re-extracted).",
    )
    parser.add_argument("trial_dir", type=Path, help="a finished trial's output directory")
    parser.add_argument(
        "--out", type=Path, default=None, help="the folder to write (default: TRIAL_DIR/model)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--device",
        default=None,
        help="load the model here instead of the trial's model.device (e.g. cpu)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="also upload the folder to this hub model repo (OWNER/NAME; needs the network "
        "and a token)",
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo private")
    parser.add_argument(
        "--any-weights",
        action="store_true",
        help="export even when the model's weights are not the ones the trial recorded "
        "(a moved or copied local folder, say)",
    )
    args = parser.parse_args(argv)
    try:
        if args.push_to_hub is not None:
            check_push_possible(args.push_to_hub)
        folder = export_trial(
            args.trial_dir,
            args.out,
            overwrite=args.overwrite,
            device=args.device,
            check_identity=not args.any_weights,
        )
    except (ExportError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    if args.push_to_hub is not None:
        try:
            url = push_to_hub(folder, args.push_to_hub, args.private)
        except Exception as error:  # network, auth, quota: the folder is kept either way
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(
                f"error: pushing {folder} to {args.push_to_hub} failed: {first_line} (the folder "
                "is written; upload it later with hf upload)",
                file=sys.stderr,
            )
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
