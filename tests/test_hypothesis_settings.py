"""Property: no numeric eval or judge setting yields a number that was not measured (issue 19).

Hypothesis draws the numeric ``eval`` settings (sizes of the three evaluated sets, KL prompts,
tokens and top-k, generated tokens, floor), the batch sizes and the judge's numeric settings, and
runs a whole trial on the tiny random-init model for each draw. Every draw must end in one of two
ways:

- a ``ConfigError`` naming one of the drawn keys (the setting is rejected before anything runs);
- results whose every rate has its ``n`` and its count (``rate == count / n``; ``n = 0`` gives
  a null rate, interval and count, never 0.0), whose every KL has its ``n_kl_prompts`` (the
  prompts its teacher-forced pass ran over), and whose completions.jsonl holds exactly the rows
  the counts claim.

The prompt pools are small (3 harmful per category, 2 matched per category, 16 generic harmless
prompts), so sizes above them occur and must be refused, never silently reduced. Bounded to run
in a minute or two: ``max_examples`` is small, examples are derandomised (a CI failure
reproduces), and the model, activations and prompt sets are shared by all examples.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from abliterate.config import ConfigError, register_configs
from abliterate.pipeline import Session, run_trial

CONF = str(Path(__file__).resolve().parents[1] / "conf")
POOLS = {"harmful_per_category": 3, "matched": 18, "unmatched": 16}
BASE = [
    "model=hub", "model.name=tiny-llama", "model.default_layer=1", "model.dtype=float32",
    "model.device=cpu", "logger=none", "eval=quick", "extraction=diff_in_means",
    "data.harmful_train.per_category=2", "data.matched_train.per_category=2",
    "data.unmatched_train.limit=12",
    f"data.harmful_eval.per_category={POOLS['harmful_per_category']}",
    f"data.matched_eval.per_category={POOLS['matched'] // 9}",
    f"data.unmatched_eval.limit={POOLS['unmatched']}",
]  # fmt: skip

# each key's valid values (sizes may exceed the pools: those must be refused) ...
VALID = {
    "eval.harmful_per_category": st.integers(1, POOLS["harmful_per_category"] + 1),
    "eval.n_harmful": st.one_of(st.none(), st.integers(1, 30)),
    "eval.n_unmatched": st.integers(0, 12),
    "eval.n_matched": st.integers(0, POOLS["matched"] + 2),
    "eval.kl_prompts": st.integers(1, 12),
    "eval.kl_tokens": st.integers(1, 4),
    "eval.kl_top_k": st.one_of(st.none(), st.integers(1, 200)),  # the vocabulary is 128
    "eval.max_new_tokens": st.integers(1, 6),
    "eval.kl_floor": st.floats(1e-6, 1.0),
    "model.batch_size": st.integers(0, 40),
    "judge.batch_size": st.integers(1, 64),
    "judge.max_length": st.integers(1, 600),
    "judge.max_new_tokens": st.integers(1, 16),
    "judge.max_response_chars": st.integers(1, 5000),
}
# ... and out-of-range ones, of which a draw replaces up to two
NON_POSITIVE = st.integers(-3, 0)
NEGATIVE = st.integers(-3, -1)
INVALID = {
    **dict.fromkeys(VALID, NON_POSITIVE),
    "eval.n_unmatched": NEGATIVE,
    "eval.n_matched": NEGATIVE,
    "model.batch_size": NEGATIVE,
    "eval.kl_floor": st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf]),
}


@st.composite
def eval_settings(draw) -> dict:
    drawn = {key: draw(strategy) for key, strategy in VALID.items()}
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=2, unique=True)):
        drawn[key] = draw(INVALID[key])
    return drawn


RATES = {  # rate -> (the n it is out of, the counts block and outcome, or the count key)
    "refusal_rate": ("n_harmful", ("outcomes", "REFUSE")),
    "evasive_rate": ("n_harmful", ("outcomes", "EVASIVE")),
    "comply_rate": ("n_harmful", ("outcomes", "COMPLY")),
    "incoherent_rate": ("n_harmful", ("outcomes", "INCOHERENT")),
    "harmless_refusal_rate": ("n_harmless", ("harmless_outcomes", "REFUSE")),
    "harmless_evasive_rate": ("n_harmless", ("harmless_outcomes", "EVASIVE")),
    "matched_harmless_refusal_rate": ("n_matched", ("matched_outcomes", "REFUSE")),
}
BASELINE_RATES = {
    "refusal_rate": ("n_harmful", ("outcomes", "REFUSE")),
    "harmless_refusal_rate": ("n_harmless", None),
    "matched_harmless_refusal_rate": ("n_matched", None),
}


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    """One session and one cache for every example: the model loads once (per batch size) and
    the training activations are computed once."""
    register_configs()
    return Session(), tmp_path_factory.mktemp("hypothesis-cache"), tiny_model_dir


def _format(value) -> str:
    if value is None:
        return "null"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _check_rate(block: dict, rate: str, n_key: str, count_of, where: str) -> None:
    n, value, interval = block[n_key], block[rate], block[f"{rate}_ci95"]
    assert isinstance(n, int) and n >= 0, (where, n_key, n)
    if n == 0:
        assert value is None and interval is None, (where, rate, value, interval)
        if count_of is not None:
            assert block[count_of[0]] is None, (where, count_of)
        return
    assert value is not None and 0.0 <= value <= 1.0, (where, rate, value)
    assert interval is not None and interval[0] <= value <= interval[1], (where, rate, interval)
    if count_of is not None:
        counts = block[count_of[0]]
        assert counts is not None and sum(counts.values()) == n, (where, count_of, counts, n)
        assert math.isclose(value, counts[count_of[1]] / n), (where, rate, value, counts, n)


def _check_results(results: dict, settings_: dict, output_dir: Path) -> None:
    ev, base = results["eval"], results["baseline_eval"]
    # the counts are the ones asked for (never silently reduced)
    expected_harmful = (
        settings_["eval.n_harmful"]
        if settings_["eval.n_harmful"] is not None
        else 9 * settings_["eval.harmful_per_category"]
    )
    assert ev["n_harmful"] == base["n_harmful"] == expected_harmful
    assert ev["n_harmless"] == base["n_harmless"] == settings_["eval.n_unmatched"]
    assert ev["n_matched"] == base["n_matched"] == settings_["eval.n_matched"]
    assert ev["n_kl_prompts"] == settings_["eval.kl_prompts"] >= 1
    for rate, (n_key, count_of) in RATES.items():
        _check_rate(ev, rate, n_key, count_of, "eval")
    for rate, (n_key, count_of) in BASELINE_RATES.items():
        _check_rate(base, rate, n_key, count_of, "baseline_eval")
    assert ev["refusals"] == ev["outcomes"]["REFUSE"]
    assert sum(ev["outcomes"].values()) == ev["n_harmful"]
    for category, row in ev["outcomes_by_category"].items():
        assert row["n"] >= 1 and sum(v for k, v in row.items() if k != "n") == row["n"]
        assert math.isclose(ev["refusal_rate_by_category"][category], row["REFUSE"] / row["n"])
    # the KL: measured over its prompts, with the settings recorded as used
    kl = ev["kl_divergence"]
    assert kl is not None and math.isfinite(kl) and kl >= -1e-6, kl
    assert ev["kl_tokens"] == settings_["eval.kl_tokens"] >= 1
    assert ev["kl_top_k"] == settings_["eval.kl_top_k"]
    assert ev["kl_top_k"] is None or ev["kl_top_k"] >= 1
    assert math.isclose(
        ev["efficiency"], ev["refusals_removed"] / max(kl, settings_["eval.kl_floor"])
    )
    # and completions.jsonl holds exactly the rows the counts claim
    rows = [json.loads(line) for line in (output_dir / "completions.jsonl").open()]
    for name, n_key in (("harmful", "n_harmful"), ("unmatched", "n_harmless"),
                        ("matched", "n_matched")):  # fmt: skip
        assert sum(row["set"] == name for row in rows) == ev[n_key], name


@settings(
    max_examples=24,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=eval_settings())
def test_no_setting_reports_a_number_without_its_count(shared, drawn):
    session, cache, model_dir = shared
    overrides = [f"{key}={_format(value)}" for key, value in drawn.items()]
    with tempfile.TemporaryDirectory() as out:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    *BASE, f"model.path={model_dir}", f"paths.cache_dir={cache}",
                    f"paths.output_dir={out}", *overrides,
                ],
            )  # fmt: skip
        try:
            results = run_trial(cfg, session=session)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message, message
            assert any(key in message for key in drawn), message
            assert not (Path(out) / "results.json").exists()
            event(f"refused: {message.split('=')[0]}")
            return
        _check_results(results, drawn, Path(out))
        event("measured")


FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(entropy=FLOATS, repeat=FLOATS, words=st.integers(-3, 10))
def test_coherence_thresholds_are_in_range_or_refused(entropy, repeat, words):
    from abliterate.classify import CoherenceThresholds, is_coherent

    try:
        thresholds = CoherenceThresholds(entropy, repeat, words)
    except ValueError as error:
        name = str(error).split("=")[0]
        assert name in ("min_bigram_entropy", "max_repeat_fraction", "min_words"), error
        return
    assert math.isfinite(thresholds.min_bigram_entropy) and thresholds.min_bigram_entropy >= 0
    assert 0 < thresholds.max_repeat_fraction <= 1 and thresholds.min_words >= 0
    for text in ("", "the the the the", " ".join(f"word{i}" for i in range(40))):
        assert isinstance(is_coherent(text, thresholds), bool)
