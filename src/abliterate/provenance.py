"""What a result depends on: config hash, code version, library versions, model identity.

Every cache key and every results.json is tied to these, so that nothing computed under other
settings, other code or other weights is ever reused as if it were current:

- :func:`config_hash`: the resolved trial config without the keys that cannot change a result
  (``logger``, ``paths``, ``force``, ``objectives``);
- :data:`RESULTS_VERSION`: bumped by hand whenever a change alters what a trial computes (a
  number, a label, a file format); it is part of :func:`code_version`, which a relaunch compares
  before it skips a finished trial, and of every cache key;
- :func:`library_versions`: torch and transformers change numerics, so cache keys include them;
- :func:`model_identity`: what the weights are (a hub commit, a content signature of a local
  folder, the GGUF file itself), not what the config calls them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

import abliterate
from abliterate.choices import (
    DEFAULT_REFUSER_RECIPE,
    HASHLESS_REFUSER_RECIPE,
    ModelSource,
    RecipeName,
)

log = logging.getLogger(__name__)

# 1: schema-1 results (three labels, KL over forced text). 2: KL stops where the original ends,
# effective counts and provenance recorded, seeds and memo keys fixed (issue 13).
RESULTS_VERSION = 2

# Top-level config keys that never change a trial's numbers.
NON_RESULT_KEYS: tuple[str, ...] = ("logger", "paths", "force", "objectives", "hydra")

_HASH_CHARS = 16


def digest(payload: Any, chars: int = _HASH_CHARS) -> str:
    """A short sha256 of a JSON-serialisable payload (keys sorted; anything else via ``str``)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def code_version() -> str:
    """The package version and the results version: what a relaunch compares."""
    return f"{abliterate.__version__}+results.{RESULTS_VERSION}"


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout the package runs from (``-dirty`` if modified), or None."""
    root = Path(abliterate.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics or behaviour a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "minisom", "numpy", "safetensors", "hydra-core"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def cache_key(parts: Mapping[str, Any], chars: int = 20) -> str:
    """A cache key over ``parts`` plus the code's results version and the numeric libraries."""
    versions = library_versions()
    return digest(
        {
            **parts,
            "results_version": RESULTS_VERSION,
            "torch": versions.get("torch"),
            "transformers": versions.get("transformers"),
        },
        chars,
    )


def result_config(cfg: Any) -> dict[str, Any]:
    """The resolved config without the keys that cannot change a result."""
    if isinstance(cfg, DictConfig):
        # a DictConfig's keys are typed as any DictKeyType; a run config's keys are all str
        keys = cast(list[str], [k for k in cfg if k not in NON_RESULT_KEYS])
        kept = OmegaConf.masked_copy(cfg, keys)
        result: dict[str, Any] = OmegaConf.to_container(kept, resolve=True)  # type: ignore[assignment]
    else:
        result = {k: v for k, v in dict(cfg).items() if k not in NON_RESULT_KEYS}
    model = result.get("model")
    if isinstance(model, dict) and model.get("device_map") is None and "device_map" in model:
        # model.device_map came later: unset, it leaves the hash of every earlier trial as it was
        result["model"] = model = {k: v for k, v in model.items() if k != "device_map"}
    if isinstance(model, dict) and "recipe" in model:
        result["model"] = model_for_hash(model)
    return result


def hashed_recipe(model: Mapping[str, Any]) -> str | None:
    """The embedded refuser recipe that sets a trial apart (its config hash, its report label):
    the recipe resolved, None for v9 (what every trial ran on before ``model.recipe`` existed)
    and for a model that is not embedded. A config written before the field existed ran on v9
    whatever the default is now; a null recipe is the default."""
    if "recipe" not in model:
        return None
    recipe = model.get("recipe")
    if str(model.get("source")) == ModelSource.embedded and recipe is None:
        recipe = DEFAULT_REFUSER_RECIPE
    return None if recipe is None or recipe == HASHLESS_REFUSER_RECIPE else str(recipe)


def model_for_hash(model: dict[str, Any]) -> dict[str, Any]:
    """``model.recipe`` came later. The hash holds the recipe an embedded model is built from,
    the default resolved (null is ``DEFAULT_REFUSER_RECIPE``, v16 since session 11), so a trial
    finished on another build is not taken as this one's, also once the default changes; v9, what every earlier trial ran on, and a null recipe
    of another source leave the hash as it was."""
    recipe = hashed_recipe(model)
    rest = {k: v for k, v in model.items() if k != "recipe"}
    return rest if recipe is None else {**rest, "recipe": recipe}


def config_hash(cfg: Any) -> str:
    """A hash of :func:`result_config`: equal for two configs that must give equal results."""
    return digest(result_config(cfg))


def recorded_recipe(results: Mapping[str, Any]) -> str | None:
    """The refuser recipe a finished trial ran on (None: its model is not the embedded one).

    A config without ``model.recipe`` ran on v9 (the field came later). A null recipe meant the
    default *when the trial ran*, and the default has changed (v9 until session 11, then v16):
    it is the recipe whose config hash equals the one the trial recorded
    (``provenance.config_hash``, which resolved the default then); without a recorded hash, the
    current default.
    """
    config = results.get("config")
    if not isinstance(config, dict):
        return None
    model = config.get("model")
    if not isinstance(model, dict) or str(model.get("source")) != ModelSource.embedded:
        return None
    if "recipe" not in model:
        return str(HASHLESS_REFUSER_RECIPE)
    if model["recipe"] is not None:
        return str(model["recipe"])
    recorded = (results.get("provenance") or {}).get("config_hash")
    if recorded:
        for name in (DEFAULT_REFUSER_RECIPE, *RecipeName):
            if config_hash({**config, "model": {**model, "recipe": str(name)}}) == recorded:
                return str(name)
    return str(DEFAULT_REFUSER_RECIPE)


def with_recorded_recipe(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results["config"]`` with a null ``model.recipe`` replaced by :func:`recorded_recipe` (the
    build the trial ran on), so that labels, cells and reloads read the recipe, not today's
    default; other configs unchanged."""
    config = dict(results.get("config") or {})
    model = config.get("model")
    if isinstance(model, dict) and "recipe" in model and model["recipe"] is None:
        recipe = recorded_recipe(results)
        if recipe is not None:
            config["model"] = {**model, "recipe": recipe}
    return config


def _file_signature(path: Path) -> list[Any]:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def folder_signature(directory: Path) -> str:
    """A content signature of a local model folder: every file's name, size and mtime (and the
    safetensors index's content), without reading the weights."""
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = str(path.relative_to(directory))
        if relative.startswith(".") or "/." in relative:
            continue  # lock files, .cache/ of huggingface_hub
        stat = path.stat()
        entries.append([relative, stat.st_size, stat.st_mtime_ns])
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        entries.append(["index", hashlib.sha256(index.read_bytes()).hexdigest()])
    return digest(entries)


def model_identity(
    source: str, path: str | Path, model_config: Any = None, revision: str | None = None
) -> str:
    """What the loaded weights are.

    Args:
        source: ``hub`` (repo id or local folder), ``gguf`` (the file) or ``embedded`` (a folder).
        path: the repo id, the folder, or the GGUF file itself.
        model_config: the loaded transformers config; a hub load sets its ``_commit_hash``.
    """
    local = Path(path).expanduser()
    if source == "gguf" or local.is_file():
        return f"gguf:{local.resolve()}:{digest(_file_signature(local))}"
    if local.is_dir():
        return f"{source}-dir:{local.resolve()}:{folder_signature(local)}"
    commit = getattr(model_config, "_commit_hash", None)
    if not commit:
        # remote code or an unusual loader: the configured revision is the best name left
        log.warning("model %s: no resolved hub commit; identified by its revision name", path)
        return f"hub:{path}@{revision or 'main'}:unresolved"
    return f"hub:{path}@{commit}"


def provenance_record(
    cfg: Any, batch_size: int | None, model_identity: str | None = None
) -> dict[str, Any]:
    """The ``provenance`` block of results.json. ``model_identity`` (:func:`model_identity` of the
    loaded weights) lets ``abliterate.export`` check that it edits the trial's weights."""
    return {
        "config_hash": config_hash(cfg),
        "code_version": code_version(),
        "git_commit": git_commit(),
        "versions": library_versions(),
        "batch_size": batch_size,
        "model_identity": model_identity,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "hostname": platform.node(),
    }
