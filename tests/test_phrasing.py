"""The phrasing-balanced corpus (abliterate.phrasing) and its part in the refuser's recipe and card.

The corpus is a separate file so that the builtin splits the experiments use stay as they were:
the first test pins them, byte for byte, to the splits before the corpus existed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections import Counter

import pytest

from abliterate import phrasing, refuser
from abliterate.config import HARM_CATEGORIES
from abliterate.phrasing import FAMILIES, KINDS, SPLITS, load_phrasing, read_rows, split_of
from abliterate.prompts import BUILTIN_KINDS, PromptDataError, _read_builtin_rows, load_builtin

# sha256 of json.dumps([prompts, categories]) of each builtin split, taken at commit aa69469,
# before the phrasing corpus existed
BUILTIN_SPLITS_BEFORE = {
    ("harmful", "refuser_train"): "aa73812cb818ee6db22db7609a550bc7b91d13844d6aaf8afc4138af1b803947",
    ("harmful", "extraction"): "32165c40ecf01f9a447529f4431312b03edcacd867848805a47015492b513032",
    ("harmful", "evaluation"): "1d3e12e27f2ecf47cd6fcea38d331c2ba1186146f9f7e1df9a7a10205d88ea01",
    ("matched", "refuser_train"): "bcb13bbb3b302674ba2791bb8e71be9cee803b6e8c64cd556d8fb12a7801dd13",
    ("matched", "extraction"): "4ae461db3de5f08d0113c3c93f4f29cfe44e6bd3c991de5c45771b376331a661",
    ("matched", "evaluation"): "e3e31c3970e9206aa2b8f9f515695d31f683c81b00ddf1ef6d33684ad0c51805",
    ("unmatched", "refuser_train"): "fc904c9de2d321081f4da887637449177a6b10932dca8cad3f4c1d189f90ec87",
    ("unmatched", "extraction"): "8983d6a2c266299a7902ca04496bf0a0aa49779649223caa6df6f1f422cfb06f",
    ("unmatched", "evaluation"): "b07cbda35a5d09c6732904140dc75e2603dfb08c77626dfee0fd4ecf4f052b5c",
}  # fmt: skip


@pytest.mark.parametrize(("kind", "split"), list(BUILTIN_SPLITS_BEFORE))
def test_builtin_splits_are_byte_identical_to_before(kind, split):
    prompt_set = load_builtin(kind, split)
    content = json.dumps([prompt_set.prompts, prompt_set.categories]).encode()
    assert hashlib.sha256(content).hexdigest() == BUILTIN_SPLITS_BEFORE[(kind, split)]


def test_every_harm_category_in_every_family():
    rows = read_rows()
    harmful = Counter((r["family"], r["category"]) for r in rows if r["kind"] == "harmful")
    matched = Counter((r["family"], r["category"]) for r in rows if r["kind"] == "matched")
    generic = Counter(r["family"] for r in rows if r["kind"] == "unmatched")
    for family in FAMILIES:
        for category in HARM_CATEGORIES:
            assert harmful[(family, category)] >= 4, (family, category)
            assert matched[(family, category)] >= 2, (family, category)
        assert generic[family] >= 8, family
    assert {r.get("category") for r in rows if r["kind"] != "unmatched"} == set(HARM_CATEGORIES)
    assert all("category" not in r for r in rows if r["kind"] == "unmatched")


def test_prompts_are_unique_here_and_against_the_builtin_corpus():
    normalize = lambda p: " ".join(p.lower().split())  # noqa: E731
    prompts = [r["prompt"] for r in read_rows()]
    assert all(p.strip() and p == p.strip() for p in prompts)
    assert len({normalize(p) for p in prompts}) == len(prompts)
    builtin = {normalize(r["prompt"]) for kind in BUILTIN_KINDS for r in _read_builtin_rows(kind)}
    assert not [p for p in prompts if normalize(p) in builtin]


def test_no_near_duplicates():
    rows = read_rows()
    for kind in KINDS:
        prompts = [r["prompt"].lower() for r in rows if r["kind"] == kind]
        for i, first in enumerate(prompts):
            matcher = difflib.SequenceMatcher(None, first)
            for second in prompts[i + 1 :]:
                matcher.set_seq2(second)
                if matcher.real_quick_ratio() > 0.85 and matcher.quick_ratio() > 0.85:
                    assert matcher.ratio() <= 0.85, (first, second)


FORMS = {
    # what each family's prompts look like (the tags are what the leave-one-family-out check
    # relies on, so they are checked, loosely)
    "question": lambda p: p.endswith("?") and "." not in p[:-1].rstrip("."),
    "list": lambda p: re.match(r"(List|Name|Give me a list|Enumerate)\b", p) is not None,
    "steps": lambda p: (
        re.search(
            r"step|stage|sequence|plan|procedure|guide|walk|outline|lay out|describe the",
            p,
            re.IGNORECASE,
        )
        is not None
    ),  # fmt: skip
    "multi": lambda p: len(re.findall(r"[.?!](\s|$)", p)) >= 2,
}


@pytest.mark.parametrize("family", list(FORMS))
def test_family_tags_match_the_phrasing(family):
    prompts = [r["prompt"] for r in read_rows() if r["family"] == family]
    mismatched = [p for p in prompts if not FORMS[family](p)]
    assert not mismatched, mismatched


def test_questions_are_not_the_majority_of_harmful_requests():
    """The builtin harmful corpus is 43% "How do / How can" questions; this one is balanced."""
    harmful = [r for r in read_rows() if r["kind"] == "harmful"]
    counts = Counter(r["family"] for r in harmful)
    assert set(counts) == set(FAMILIES) and max(counts.values()) == min(counts.values())
    how = sum(bool(re.match(r"how (do|can)", r["prompt"], re.IGNORECASE)) for r in harmful)
    assert how / len(harmful) < 0.15


def test_splits_are_disjoint_complete_deterministic_and_nonempty():
    rows = read_rows()
    assigned = split_of(rows)
    assert set(assigned) == {r["prompt"] for r in rows} and set(assigned.values()) == set(SPLITS)
    assert split_of(list(reversed(rows))) == assigned  # depends on the text only
    for kind in KINDS:
        for family in FAMILIES:
            for split in SPLITS:
                assert len(load_phrasing(kind, (split,), (family,))), (kind, family, split)
    every = [p for kind in KINDS for p in load_phrasing(kind).prompts]
    assert sorted(every) == sorted(r["prompt"] for r in rows)


def test_unknown_names_are_rejected_with_the_valid_ones():
    with pytest.raises(PromptDataError, match=r"family 'lists'.*question, imperative"):
        load_phrasing("harmful", families=("lists",))
    with pytest.raises(PromptDataError, match=r"split 'evaluation'.*train, dev, test"):
        load_phrasing("harmful", ("evaluation",))
    with pytest.raises(PromptDataError, match=r"kind 'generic'.*harmful, matched, unmatched"):
        load_phrasing("generic")


def test_no_family_means_no_rows():
    assert len(load_phrasing("harmful", ("train",), ())) == 0


def test_recipe_key_depends_on_the_corpus_only_when_it_trains_on_it(monkeypatch):
    base = refuser.find_base_gguf()
    off = refuser.RefuserRecipe(phrasing_families=())
    on = refuser.RefuserRecipe(phrasing_families=("question", "writing"))
    before = refuser.refuser_key(off, base), refuser.refuser_key(on, base)
    monkeypatch.setattr(refuser, "corpus_digest", lambda files=None: "another corpus")
    after = refuser.refuser_key(off, base), refuser.refuser_key(on, base)
    assert before[0] == after[0]  # a recipe without phrasing rows keeps its key
    assert before[1] != after[1] and before[0] != before[1]


def test_count_record_counts_refusals_with_an_interval_and_by_family():
    prompts = load_phrasing("harmful", ("test",), ("list", "writing")).prompts[:4]
    responses = ["I'm sorry, but I can't help with that.", "Sure, here it is.", "I won't.", "Ok."]
    record = refuser._count_record(prompts, responses, by_family=True)
    assert record["refused"] == 2 and record["n"] == 4 and record["rate"] == 0.5
    low, high = record["ci95"]
    assert 0 < low < 0.5 < high < 1
    families = phrasing.families_of(prompts)
    assert sum(v["n"] for v in record["by_family"].values()) == 4
    assert set(record["by_family"]) == set(families)


def test_phrasing_card_reports_held_out_and_never_trained_families(tiny_loaded):
    loaded = tiny_loaded("llama")
    trained = tuple(f for f in FAMILIES if f != "list")
    recipe = refuser.RefuserRecipe(phrasing_families=trained, eval_new_tokens=2)
    rates: dict = {}
    samples: dict = {}
    card = refuser._phrasing_evaluation(loaded, recipe, rates, samples)
    assert card["trained_families"] == list(trained)
    assert card["never_trained_families"] == ["list"]
    files = recipe.phrasing_files  # the first file only, as up to v10
    assert card["files"] == list(files) == [phrasing.DATA_FILE]
    for kind in KINDS:
        held_out = card["held_out"][kind]
        assert held_out["n"] == len(load_phrasing(kind, ("test",), trained, files))
        assert "list" not in held_out["by_family"]
        never = card["never_trained"][kind]
        assert never["n"] == len(load_phrasing(kind, SPLITS, ("list",), files))
        assert list(never["by_family"]) == ["list"]
    assert rates["never_trained_harmful_refusal_rate"] == card["never_trained"]["harmful"]["rate"]
    off = refuser.RefuserRecipe(phrasing_families=())
    assert refuser._phrasing_evaluation(loaded, off, {}, {}) == {}


def test_build_trains_on_no_row_of_a_never_trained_family():
    trained = tuple(f for f in FAMILIES if f != "list")
    never = set(load_phrasing("harmful", SPLITS, ("list",)).prompts)
    for kind in KINDS:
        assert not never & set(load_phrasing(kind, ("train",), trained).prompts)
        # and nothing the card reports as held out was trained on
        assert not set(load_phrasing(kind, ("test",), trained).prompts) & set(
            load_phrasing(kind, ("train",), trained).prompts
        )
