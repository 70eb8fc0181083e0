"""Property-based fuzzing of the two front doors: config overrides and prompt files (issue 8).

Whatever comes in, the answer is either a working config / prompt set, or an error of the
project's own kind that names the key (ConfigError, or Hydra's compose error) or the file
position (PromptDataError), never another exception from deep inside. Bounded to run in seconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from abliterate.config import ConfigError, choice_fields, register_configs, validate_config
from abliterate.prompts import PromptDataError, load_prompt_set

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# the choice fields outside the prompt sets (whose source needs a matching path), and their values
# judge.name is chosen with its group (judge=classifier also needs judge.model): not drawn here
CHOICES = {
    key: tuple(member.value for member in kind)
    for key, kind in choice_fields().items()
    if not key.startswith("data.") and key != "judge.name"
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
COMPOSE_FUZZ = settings(FUZZ, max_examples=15)  # a Hydra compose costs ~0.5-1 s on a busy CI box
BASE = ["model=hub", "model.path=unused", "model.name=fuzz", "model.default_layer=1", "logger=none"]

# values that are text the override grammar accepts as a plain string
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
NUMBERS = st.one_of(
    st.integers(-5, 40).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e308", "-0.0", "null", "true"]),
)
INT_KEYS = ("layer", "extraction.som_rows", "extraction.iterations", "extraction.top_k",
            "eval.kl_tokens", "eval.max_new_tokens", "eval.n_matched", "model.batch_size",
            "data.harmful_train.limit", "data.matched_train.skip_per_category")  # fmt: skip
FLOAT_KEYS = ("ablation.weight", "extraction.sigma", "extraction.learning_rate", "eval.kl_floor")


def _choice_override(draw_key: str) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(st.just(draw_key), st.one_of(st.sampled_from(CHOICES[draw_key]), WORDS))


OVERRIDES = st.lists(
    st.one_of(
        st.sampled_from(sorted(CHOICES)).flatmap(_choice_override),
        st.tuples(st.sampled_from(INT_KEYS + FLOAT_KEYS), NUMBERS),
        st.tuples(st.sampled_from(INT_KEYS + FLOAT_KEYS), WORDS),
        st.tuples(
            st.sampled_from(["data.harmful_eval.source", "data.unmatched_train.path"]), WORDS
        ),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda pair: pair[0],
)


@pytest.fixture(scope="module")
def hydra_context():
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        yield


def _names(error: BaseException) -> str:
    text = []
    while error is not None:
        text.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(text)


@COMPOSE_FUZZ
@given(pairs=OVERRIDES)
def test_any_override_is_valid_or_rejected_naming_its_key(hydra_context, pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        cfg = compose("config", overrides=BASE + overrides)
    except (HydraException, OmegaConfBaseException) as error:  # compose-time: type, grammar
        message = _names(error)
        assert any(key in message for key, _ in pairs), message
        return
    try:
        validate_config(cfg)
    except ConfigError as error:
        assert any(str(error).startswith(f"{key}=") or f"{key}" in str(error) for key, _ in pairs)
        return
    # accepted: then every choice key holds an allowed value and numbers are in range
    for key, allowed in CHOICES.items():
        assert cfg_value(cfg, key) in allowed
    weight = cfg.ablation.weight
    assert weight == weight and weight >= 0 and weight != float("inf")


def cfg_value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@settings(COMPOSE_FUZZ, max_examples=6)
@given(
    choices=st.fixed_dictionaries({key: st.sampled_from(values) for key, values in CHOICES.items()})
)
def test_every_combination_of_valid_choices_is_accepted(hydra_context, choices):
    cfg = compose("config", overrides=BASE + [f"{k}={v}" for k, v in choices.items()])
    validate_config(cfg)


# ---------------------------------------------------------------- prompt files

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["prompt", "category", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)
JSON_ROWS = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"prompt": st.text(max_size=30)},
            optional={"category": st.text(max_size=8) | st.none() | st.integers()},
        ),
        JSON_VALUES,
    ),
    max_size=8,
)
CSV_ROWS = st.lists(st.lists(st.text(max_size=15), min_size=0, max_size=4), max_size=8)
POSITION = re.compile(r":(\d+|item \d+):")


def _source(path: Path, category_column: str | None):
    return SimpleNamespace(source="file", path=str(path), split=None, column="prompt",
                           category_column=category_column, limit=None, per_category=None,
                           skip_per_category=0)  # fmt: skip


def _check_load(path: Path, category_column: str | None) -> None:
    try:
        prompt_set = load_prompt_set("harmful_train", _source(path, category_column))
    except PromptDataError as error:
        message = str(error)
        assert str(path) in message, message
        if "not valid" in message and "UTF-8" in message:
            assert POSITION.search(message), message
        return
    assert len(prompt_set) > 0
    assert all(p and p == p.strip() for p in prompt_set.prompts)
    assert len(set(prompt_set.prompts)) == len(prompt_set.prompts)
    if category_column is not None:
        assert all(c for c in prompt_set.categories)


@FUZZ
@given(
    content=st.binary(max_size=200),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".txt"]),
    category_column=st.sampled_from([None, "category"]),
)
def test_random_bytes_load_or_name_the_file(tmp_path_factory, content, suffix, category_column):
    path = tmp_path_factory.mktemp("bytes") / f"prompts{suffix}"
    path.write_bytes(content)
    _check_load(path, category_column)


@FUZZ
@given(
    rows=JSON_ROWS,
    as_list=st.booleans(),
    category_column=st.sampled_from([None, "category"]),
    separator=st.sampled_from(["\n", "\r\n", "\n\n"]),
)
def test_random_json_rows_load_or_name_file_and_line(
    tmp_path_factory, rows, as_list, category_column, separator
):
    directory = tmp_path_factory.mktemp("json")
    if as_list:
        path = directory / "prompts.json"
        path.write_text(json.dumps(rows))
    else:
        path = directory / "prompts.jsonl"
        path.write_text(separator.join(json.dumps(row) for row in rows))
    try:
        load_prompt_set("harmful_train", _source(path, category_column))
    except PromptDataError as error:
        assert str(path) in str(error), str(error)
        if not as_list and rows:
            # every row error of a JSON-lines file gives its line
            assert POSITION.search(str(error)) or "no prompts" in str(error), str(error)
        return
    _check_load(path, category_column)


@FUZZ
@given(
    header=st.lists(
        st.sampled_from(["prompt", "category", "other"]) | st.text(max_size=6),
        min_size=1,
        max_size=3,
    ),
    rows=CSV_ROWS,
    delimiter=st.sampled_from([",", "\t"]),
    category_column=st.sampled_from([None, "category"]),
)
def test_random_csv_loads_or_names_file_and_line(
    tmp_path_factory, header, rows, delimiter, category_column
):
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("csv") / ("prompts.tsv" if delimiter == "\t" else "prompts.csv")
    path.write_text(buffer.getvalue())
    try:
        load_prompt_set("harmful_train", _source(path, category_column))
    except PromptDataError as error:
        message = str(error)
        assert str(path) in message, message
        if "no prompts" not in message:
            assert POSITION.search(message), message
        return
    _check_load(path, category_column)
