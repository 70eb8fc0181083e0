"""The builtin corpus: counts, uniqueness, categories, disjoint deterministic splits; sources."""

from __future__ import annotations

import difflib
import json
from types import SimpleNamespace

import pytest

from abliterate.config import HARM_CATEGORIES
from abliterate.prompts import (
    BUILTIN_KINDS,
    SPLITS,
    PromptDataError,
    PromptSet,
    _read_builtin_rows,
    load_builtin,
    load_prompt_set,
    load_refusal_texts,
    split_rows,
)


def _source(**kwargs):
    base = dict(source="file", path=None, split=None, column="prompt", category_column=None,
                limit=None, per_category=None, skip_per_category=0)  # fmt: skip
    return SimpleNamespace(**{**base, **kwargs})


@pytest.mark.parametrize("kind", ["harmful", "matched"])
def test_categorised_sets_cover_every_category_with_40_or_more(kind):
    rows = _read_builtin_rows(kind)
    counts = {c: sum(r["category"] == c for r in rows) for c in HARM_CATEGORIES}
    assert set(r["category"] for r in rows) == set(HARM_CATEGORIES)
    assert min(counts.values()) >= 40, counts


def test_unmatched_pool_has_400_or_more():
    assert len(_read_builtin_rows("unmatched")) >= 400


def test_all_prompts_are_unique_across_the_corpus():
    prompts = [r["prompt"] for kind in BUILTIN_KINDS for r in _read_builtin_rows(kind)]
    normalized = [" ".join(p.lower().split()) for p in prompts]
    assert len(set(normalized)) == len(normalized)
    assert all(p.strip() and p == p.strip() for p in prompts)


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_no_near_duplicates_within_a_category(kind):
    rows = _read_builtin_rows(kind)
    by_category: dict[str, list[str]] = {}
    for row in rows:
        by_category.setdefault(row.get("category", ""), []).append(row["prompt"].lower())
    for category, prompts in by_category.items():
        for i, first in enumerate(prompts):
            matcher = difflib.SequenceMatcher(None, first)
            for second in prompts[i + 1 :]:
                matcher.set_seq2(second)
                if matcher.real_quick_ratio() > 0.85 and matcher.quick_ratio() > 0.85:
                    assert matcher.ratio() <= 0.85, (category, first, second)


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_splits_are_disjoint_complete_and_deterministic(kind):
    rows = _read_builtin_rows(kind)
    parts = {split: [r["prompt"] for r in split_rows(rows, split)] for split in SPLITS}
    seen = [p for split in SPLITS for p in parts[split]]
    assert len(seen) == len(set(seen)) == len(rows)  # every prompt in exactly one split
    shuffled = list(reversed(rows))  # membership depends on the text only, not on file order
    assert {s: {r["prompt"] for r in split_rows(shuffled, s)} for s in SPLITS} == {
        s: set(parts[s]) for s in SPLITS
    }


def test_every_split_of_a_categorised_set_has_every_category():
    for kind in ("harmful", "matched"):
        for split in SPLITS:
            assert set(load_builtin(kind, split).categories) == set(HARM_CATEGORIES), (kind, split)


def test_refusals_all_carry_a_refusal_marker():
    from abliterate.classify import REFUSE, classify_response

    texts = load_refusal_texts()
    assert len(texts) >= 40
    assert all(classify_response(t) == REFUSE for t in texts)


def test_select_is_stratified_round_robin():
    prompt_set = PromptSet("x", tuple(f"p{i}" for i in range(9)), tuple("abc" * 3))
    chosen = prompt_set.select(limit=4)
    assert chosen.categories == ("a", "b", "c", "a")
    assert prompt_set.select(per_category=1).prompts == ("p0", "p1", "p2")
    assert prompt_set.select(per_category=1, skip_per_category=1).prompts == ("p3", "p4", "p5")


def test_file_sources_jsonl_csv_txt(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"goal": f"do thing {i}", "cat": "x"}) for i in range(3)))
    loaded = load_prompt_set(
        "harmful_eval", _source(path=str(jsonl), column="goal", category_column="cat")
    )
    assert (
        loaded.prompts == ("do thing 0", "do thing 1", "do thing 2")
        and loaded.categories == ("x",) * 3
    )
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("goal,other\nfirst prompt,1\nsecond prompt,2\n")
    assert load_prompt_set("h", _source(path=str(csv_file), column="goal")).prompts == (
        "first prompt",
        "second prompt",
    )
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_prompt_set("h", _source(path=str(txt))).prompts == ("one", "two")


def test_bad_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(PromptDataError, match=r"bad\.jsonl:2"):
        load_prompt_set("harmful_eval", _source(path=str(bad)))
    missing_column = tmp_path / "m.csv"
    missing_column.write_text("text\nhello\n")
    with pytest.raises(PromptDataError, match=r"m\.csv:2: no column 'goal'"):
        load_prompt_set("harmful_eval", _source(path=str(missing_column), column="goal"))
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"prompt": "fine"}\n{"prompt": "   "}\n')
    with pytest.raises(PromptDataError, match=r"e\.jsonl:2: column 'prompt' is empty"):
        load_prompt_set("harmful_eval", _source(path=str(empty)))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(PromptDataError, match=r"b\.txt:2: not valid UTF-8"):
        load_prompt_set("harmful_eval", _source(path=str(binary)))
    with pytest.raises(PromptDataError, match="does not exist"):
        load_prompt_set("harmful_eval", _source(path=str(tmp_path / "nope.csv")))


def test_unknown_source_and_builtin_names_are_rejected():
    with pytest.raises(PromptDataError, match="choose one of builtin, hub, file"):
        load_prompt_set("harmful_eval", _source(source="s3", path="x"))
    with pytest.raises(PromptDataError, match="choose one of harmful, matched, unmatched"):
        load_prompt_set("harmful_eval", _source(source="builtin", path="evil", split="evaluation"))
