"""Choice fields: the enums a structured config types its fixed-value fields with, and the one
message a bad value gets (at compose time, or from Python through ``parse_choice``).

Below ``config`` and ``judge.config`` so both type their fields with the same enums.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


class Choice(enum.StrEnum):
    """The values of one choice field. Member names equal their values: OmegaConf looks a value
    up by name (``Combine["merged"]``), Python by value (``Combine("merged")``), and both must
    agree. A member is a ``str``: it compares, hashes, formats and serialises (json, YAML, W&B)
    as its plain value, so results.json, config hashes and cache keys hold the same strings as
    before these fields were enums."""


class ModelSource(Choice):
    hub = "hub"  # a hub repo id or a local transformers directory
    gguf = "gguf"  # a .gguf file
    embedded = "embedded"  # the built refuser


class RecipeName(Choice):
    """The named recipes of the embedded refuser (``abliterate.refuser.RECIPES``, one entry
    each): ``model.recipe`` of an embedded model."""

    v9 = "v9"  # questions-heavy corpus; the default until session 11 (the committed study)
    v10 = "v10"
    v11 = "v11"
    v12 = "v12"  # phrasing-balanced corpus, world-knowledge requests
    v13 = "v13"  # v12 with requests set in the past or posed hypothetically
    v14 = "v14"  # v13 trained on the past frame only
    v15 = "v15"  # v13, twins weighing 0.5, more everyday requests (phrasing_everyday.jsonl)
    v16 = "v16"  # the default: v15 built faster (layers 12-29 trained, 12-token harmless targets)


# The recipe an embedded model with ``model.recipe: null`` is built from (docs/refuser.md: v16, and
# the rule it met). v9 until session 11: trials from then have the recipe in their config hash
# only when it is not v9 (provenance.model_for_hash), so a relaunch does not take them as v16's.
DEFAULT_REFUSER_RECIPE = RecipeName.v16
# The recipe every trial ran on before ``model.recipe`` existed: its config hash leaves the field out.
HASHLESS_REFUSER_RECIPE = RecipeName.v9


class Dtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    auto = "auto"  # bfloat16 on CUDA, float32 on the CPU


ChoiceT = TypeVar("ChoiceT", bound=Choice)


def choice_message(key: str, value: Any, kind: type[Choice]) -> str:
    """The one line every bad choice value gets, at compose time or from Python."""
    return f"{key}={value!r} is not valid; choose one of {', '.join(kind)}"


def parse_choice(
    kind: type[ChoiceT],
    value: Any,
    key: str,
    error: Callable[[str], Exception] = lambda message: ConfigError(message),
) -> ChoiceT:
    """``value`` as a member of ``kind``.

    A composed config already holds members; this is for a plain string that reaches a stage
    from Python (a dataclass built by hand, a SimpleNamespace), where the dataclass does not check
    it. ``error`` builds the exception (the stage's own kind), with ``choice_message``.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise error(choice_message(key, value, kind)) from None


def choice_error_line(error: BaseException) -> str | None:
    """The one-line message of a compose error that is a bad value of a ``Choice`` field, or None
    for any other error."""
    from omegaconf.errors import ValidationError

    cause = error.__cause__
    kind = getattr(getattr(cause, "child_node", None), "enum_type", None)
    if not isinstance(cause, ValidationError) or not isinstance(kind, type):
        return None
    if not issubclass(kind, Choice):
        return None
    return choice_message(str(cause.full_key), cause.value, kind)
