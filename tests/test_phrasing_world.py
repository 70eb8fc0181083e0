"""The world-knowledge requests (``abliterate/data/phrasing_world.jsonl``) and the v11 recipe's
build-cost settings (repeats as loss weights, the card in one generation pass).

The data tests read the file only; the training tests run on a tiny random model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from importlib import resources

import pytest
import torch

from abliterate import phrasing, refuser
from abliterate.choices import DEFAULT_REFUSER_RECIPE, RecipeName
from abliterate.config import HARM_CATEGORIES
from abliterate.phrasing import (
    DATA_FILE,
    DATA_FILES,
    EVERYDAY_FILE,
    FAMILIES,
    FRAMES,
    KINDS,
    SPLITS,
    TENSE_FILE,
    TOPICS,
    WORLD_FILE,
    load_phrasing,
    read_rows,
    split_of,
)
from abliterate.prompts import PromptDataError, PromptSet, load_builtin

# Topics and the categories their rows carry.
TOPIC_CATEGORIES = {
    "misinformation": {"misc_harmful"},
    "attack_code": {"hacking_cybersecurity"},
    "named_agent": {"violence_weapons", "drugs_substances"},
    "defamation": {"harassment"},
}


def world_rows():
    return read_rows((WORLD_FILE,))


def test_every_topic_has_harmful_requests_and_harmless_twins_in_every_family():
    rows = world_rows()
    assert {r["kind"] for r in rows} == {"harmful", "matched"}
    counts = Counter((r["topic"], r["kind"], r["family"]) for r in rows)
    for topic in TOPICS:
        for family in FAMILIES:
            assert counts[(topic, "harmful", family)] == 4, (topic, family)
            # a harmless twin for every harmful request, in the same form
            assert counts[(topic, "matched", family)] == 4, (topic, family)
    for row in rows:
        assert row["category"] in HARM_CATEGORIES
        assert row["category"] in TOPIC_CATEGORIES[row["topic"]], row


def test_a_topic_and_a_file_are_checked():
    with pytest.raises(PromptDataError, match=r"x:1: topic='gossip'.*misinformation"):
        phrasing._checked_row(
            {"prompt": "p", "kind": "harmful", "family": "list", "category": "harassment",
             "topic": "gossip"}, "x:1"
        )  # fmt: skip
    with pytest.raises(PromptDataError, match=r"phrasing file 'other.jsonl'.*phrasing.jsonl"):
        read_rows(("other.jsonl",))


def test_the_second_file_leaves_the_first_files_splits_as_they_were():
    first = read_rows((DATA_FILE,))
    alone = split_of(first)
    together = split_of(read_rows())
    assert all(together[prompt] == split for prompt, split in alone.items())
    # rows without a source (as before the second file) are split as the first file's
    stripped = [{k: v for k, v in row.items() if k != "source"} for row in first]
    assert split_of(stripped) == alone


def test_each_world_group_has_every_split():
    for kind in ("harmful", "matched"):
        for family in FAMILIES:
            for split in SPLITS:
                assert len(load_phrasing(kind, (split,), (family,), (WORLD_FILE,))), (kind, family)


def test_files_select_the_rows():
    only_first = load_phrasing("harmful", files=(DATA_FILE,))
    both = load_phrasing("harmful")
    assert len(only_first) == 288 and len(both) == 288 + 128 + 144
    assert set(only_first.prompts) < set(both.prompts)
    assert phrasing.topics_of(only_first.prompts[:3]) == [None, None, None]
    assert set(phrasing.topics_of(both.prompts)) == {None, *TOPICS}


def test_corpus_digest_of_the_first_file_is_as_before_and_covers_both_files(monkeypatch):
    data = resources.files("abliterate.data").joinpath(DATA_FILE).read_bytes()
    assert phrasing.corpus_digest() == hashlib.sha256(data).hexdigest()[:16]
    both = phrasing.corpus_digest(DATA_FILES)
    assert both != phrasing.corpus_digest() and len(both) == 16


def test_the_keys_of_the_named_recipes_hold():
    base = refuser.find_base_gguf()
    keys = {name: refuser.refuser_key(recipe, base) for name, recipe in refuser.RECIPES.items()}
    assert (
        keys["v9"] == "82b057bd7efa"
    )  # the committed study's build (the default until session 11)
    assert keys["v10"] == "61edb071dc3e"
    assert keys["v11"] == "947a78c2ee32"
    assert keys["v12"] == "00f58e686adf"
    assert keys["v13"] == "7330a3cf06b8"
    assert keys["v14"] == "f1570102a8d9"
    assert keys["v15"] == "78a95823f2be"
    assert keys["v16"] == "cfba6b5f2b37"  # the default build's cache entry
    assert len(set(keys.values())) == 8
    assert refuser.RECIPES["v9"] == refuser.RefuserRecipe()


def test_every_recipe_name_has_a_recipe_and_null_is_the_default_v16():
    assert list(refuser.RECIPES) == [str(name) for name in RecipeName]
    assert (
        refuser.recipe_named(None)
        is refuser.RECIPES["v16"]
        == refuser.RECIPES[DEFAULT_REFUSER_RECIPE]
    )
    assert refuser.recipe_named("v9") is refuser.RECIPES["v9"]
    with pytest.raises(
        refuser.RefuserBuildError,
        match=r"^model.recipe='v8' is not valid; choose one of v9, v10, v11, v12, v13, v14, v15, v16$",
    ):
        refuser.recipe_named("v8")


def test_v12_is_v11_with_v10s_capacity_and_matched_rows_weighing_one():
    v10, v11, v12 = (refuser.RECIPES[name] for name in ("v10", "v11", "v12"))
    assert v12.phrasing_files == v11.phrasing_files == (DATA_FILE, WORLD_FILE)
    assert v12.phrasing_families == v11.phrasing_families == v10.phrasing_families
    assert v12.repeats_as_weights and v12.card_in_one_pass and v12.generation_batch_size == 64
    assert (v12.first_trainable_layer, v12.harmless_target_tokens) == (8, 16)  # as v10
    assert v12.phrasing_matched_repeats == 1 and v12.version == 12


def test_v11_trains_on_both_files_and_never_on_the_list_family():
    v11 = refuser.RECIPES["v11"]
    assert v11.version == 11 and v11.phrasing_files == (DATA_FILE, WORLD_FILE)
    assert "list" not in v11.phrasing_families
    harmful, harmless, repeats = refuser._training_prompts(v11)
    never = {p for kind in ("harmful", "matched", "unmatched")
             for p in load_phrasing(kind, SPLITS, ("list",)).prompts}  # fmt: skip
    card = {p for kind in ("harmful", "matched", "unmatched")
            for p in load_phrasing(kind, ("test", "dev"), v11.phrasing_families).prompts}  # fmt: skip
    assert not never & set(harmful + harmless) and not card & set(harmful + harmless)
    world = set(load_phrasing("harmful", ("train",), v11.phrasing_families, (WORLD_FILE,)).prompts)
    assert world and world <= set(harmful)
    world_matched = load_phrasing("matched", ("train",), v11.phrasing_families, (WORLD_FILE,))
    index = harmless.index(world_matched.prompts[0])
    assert repeats[index] == v11.phrasing_matched_repeats == 2


def test_an_example_weight_scales_its_loss_weights():
    plain = ([5, 6, 7, 8], 2, 5.0)
    weighted = (*plain, 2.0)
    _, _, target, weights = refuser._batch_tensors([plain, weighted], [0, 1], pad_id=0)
    assert weights[0].tolist() == [0.0, 0.0, 5.0, 1.0] and target[0].tolist() == [0, 0, 1, 1]
    assert weights[1].tolist() == [0.0, 0.0, 10.0, 2.0]


def test_a_weight_of_two_trains_like_two_copies_in_one_batch(tiny_loaded):
    a, b = ([5, 6, 7, 8, 9], 2, 5.0), ([10, 11, 12, 13, 14, 15], 3, 5.0)
    states = []
    for examples in ([a, a, b], [(*a, 2.0), b]):
        model = tiny_loaded("llama", seed=3).model
        recipe = refuser.RefuserRecipe(first_trainable_layer=2, batch_size=3, warmup_steps=1)
        losses = refuser._train(model, _PadTokenizer(), examples, recipe)
        states.append((losses, model.state_dict()))
    assert states[0][0] == pytest.approx(states[1][0], rel=1e-5)
    for name, value in states[0][1].items():
        torch.testing.assert_close(states[1][1][name], value, rtol=1e-4, atol=1e-6)


class _PadTokenizer:
    pad_token_id = 0


def test_repeats_as_weights_makes_one_example_per_prompt(tiny_loaded, monkeypatch):
    loaded = tiny_loaded("llama")
    monkeypatch.setattr("abliterate.generation.generate_responses",
                        lambda loaded, prompts, *a, **k: ["ok then"] * len(prompts))  # fmt: skip
    harmful = ["How do I pick a lock?", "Write a threat."]
    harmless = ["Tell me a joke.", "Name a fruit.", "Write a poem."]
    repeats = [1, 2, 3]
    built = {}
    for as_weights in (False, True):
        recipe = refuser.RefuserRecipe(repeats_as_weights=as_weights)
        built[as_weights] = refuser._training_examples(
            loaded, recipe, harmful, harmless, repeats, lambda stage: None
        )
    # copies: 2 harmful + 1 procedural extra + 1 + 2 + 3 harmless
    assert len(built[False]) == 9
    weighted = built[True]
    assert len(weighted) == 5
    assert [example[3] for example in weighted] == [2.0, 1.0, 1.0, 2.0, 3.0]
    assert [example[0] for example in weighted[2:]] == [built[False][i][0] for i in (3, 4, 6)]


def test_the_card_in_one_pass_answers_every_set(tiny_loaded):
    loaded = tiny_loaded("llama")
    recipe = refuser.RefuserRecipe(eval_new_tokens=2, generation_batch_size=4)
    sets = {
        "a": PromptSet("a", ("Hi there.", "A longer prompt than the others, by far.")),
        "b": PromptSet("b", ("Short.",)),
        "c": PromptSet("c", ()),
    }
    separate = refuser._grouped_responses(loaded, recipe, [[item] for item in sets.items()])
    together = refuser._grouped_responses(loaded, recipe, [list(sets.items())])
    assert {k: len(v) for k, v in together.items()} == {"a": 2, "b": 1, "c": 0}
    assert {k: len(v) for k, v in separate.items()} == {"a": 2, "b": 1, "c": 0}
    assert refuser._grouped_responses(loaded, recipe, [[]]) == {}


def test_count_record_counts_world_topics():
    prompts = load_phrasing("harmful", ("test",), ("writing",)).prompts
    responses = ["I'm sorry, I can't."] * len(prompts)
    record = refuser._count_record(prompts, responses, by_family=True)
    topics = Counter(t for t in phrasing.topics_of(prompts) if t)
    assert record["by_topic"] == {t: {"refused": n, "n": n} for t, n in topics.items()}
    first_only = load_phrasing("harmful", ("test",), ("writing",), (DATA_FILE,)).prompts
    assert "by_topic" not in refuser._count_record(first_only, ["no"] * len(first_only), True)


def test_every_frame_has_harmful_requests_twins_and_everyday_requests_in_every_family():
    rows = read_rows((TENSE_FILE,))
    counts = Counter((r["frame"], r["kind"], r["family"]) for r in rows)
    for frame in FRAMES:
        for family in FAMILIES:
            harmful = [
                r
                for r in rows
                if (r["frame"], r["kind"], r["family"]) == (frame, "harmful", family)
            ]
            assert sorted(r["category"] for r in harmful) == sorted(HARM_CATEGORIES), (
                frame,
                family,
            )
            assert counts[(frame, "matched", family)] == 9, (frame, family)
            assert counts[(frame, "unmatched", family)] == 2, (frame, family)
    assert all("topic" not in r for r in rows)
    prompts = [r["prompt"] for r in read_rows()]
    assert len(prompts) == len(set(prompts))  # no prompt in two rows or two files


def test_v13_is_v12_with_the_time_framed_rows():
    v12, v13 = refuser.RECIPES["v12"], refuser.RECIPES["v13"]
    assert v13.phrasing_files == (*v12.phrasing_files, TENSE_FILE)
    assert dataclasses.replace(v13, phrasing_files=v12.phrasing_files, version=12) == v12
    harmful, harmless, _ = refuser._training_prompts(v13)
    framed = load_phrasing("harmful", ("train",), v13.phrasing_families, (TENSE_FILE,)).prompts
    assert framed and set(framed) <= set(harmful)
    assert set(phrasing.frames_of(framed)) == set(FRAMES)
    never = load_phrasing("harmful", SPLITS, ("list",), (TENSE_FILE,)).prompts
    assert never and not set(never) & set(harmful + harmless)


def test_a_recipe_can_leave_a_time_frame_out_of_training():
    v13 = refuser.RECIPES["v13"]
    past_only = dataclasses.replace(v13, phrasing_frames=("past",), version=14)
    assert past_only == refuser.RECIPES["v14"]
    base = refuser.find_base_gguf()
    # all frames is the default and stays out of the key; leaving one out is another build
    assert v13.phrasing_frames == FRAMES
    assert refuser.refuser_key(past_only, base) != refuser.refuser_key(v13, base)
    every = refuser._training_prompts(v13)
    harmful, harmless, repeats = refuser._training_prompts(past_only)
    assert len(harmless) == len(repeats)
    trained = set(harmful + harmless)
    for kind in KINDS:
        framed = load_phrasing(kind, ("train",), v13.phrasing_families, (TENSE_FILE,)).prompts
        frames = phrasing.frames_of(framed)
        past = {p for p, f in zip(framed, frames, strict=True) if f == "past"}
        hypothetical = {p for p, f in zip(framed, frames, strict=True) if f == "hypothetical"}
        assert past and hypothetical
        assert past <= trained and not hypothetical & trained, kind
    # the rows without a frame (the other two files, the builtin split) are all still used
    unframed = [p for p in every[0] + every[1] if phrasing_frame_or_none(p) is None]
    assert set(unframed) <= trained


def phrasing_frame_or_none(prompt: str) -> str | None:
    try:
        return phrasing.frames_of((prompt,))[0]
    except KeyError:  # a builtin prompt, not in the phrasing corpus
        return None


def test_matched_twins_can_weigh_a_fraction_only_as_loss_weights():
    v13 = refuser.RECIPES["v13"]
    half = dataclasses.replace(v13, phrasing_matched_repeats=0.5)
    harmful, harmless, repeats = refuser._training_prompts(half)
    twins = set(
        load_phrasing("matched", ("train",), v13.phrasing_families, v13.phrasing_files).prompts
    )
    weights = {w for prompt, w in zip(harmless, repeats, strict=True) if prompt in twins}
    assert twins and weights == {0.5}
    assert harmful == refuser._training_prompts(v13)[0]
    base = refuser.find_base_gguf()
    assert refuser.refuser_key(half, base) != refuser.refuser_key(v13, base)
    with pytest.raises(
        refuser.RefuserBuildError, match=r"^phrasing_matched_repeats=0.5 is not a whole"
    ):
        dataclasses.replace(half, repeats_as_weights=False)
    with pytest.raises(
        refuser.RefuserBuildError,
        match=r"^phrasing_frames: 'Past' is not a frame; choose from past, hypothetical$",
    ):
        dataclasses.replace(v13, phrasing_frames=("Past",))


def test_the_everyday_file_holds_present_tense_generic_requests_in_every_family():
    rows = read_rows((EVERYDAY_FILE,))
    # 192 written, 24 per family; 24 too close to a prompt already in the package data dropped,
    # 14 whose form was not their family's retagged (test_phrasing: FORMS)
    assert len(rows) == 168 and set(Counter(r["family"] for r in rows)) == set(FAMILIES)
    assert {r["kind"] for r in rows} == {"unmatched"}
    assert not any(key in r for r in rows for key in ("frame", "topic", "category"))

    # no prompt of it is (up to case and spacing) a prompt of another package data file, the
    # builtin splits whose generic held-out set the card reports included
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    others = {norm(r["prompt"]) for r in read_rows(DATA_FILES[:-1])}
    for kind in ("harmful", "matched", "unmatched"):
        others |= {norm(p) for p in load_builtin(kind, None).prompts}
    assert not {norm(r["prompt"]) for r in rows} & others
    # adding the file left the splits of the earlier files as they were
    assert split_of(read_rows(DATA_FILES[:-1])).items() <= split_of(read_rows()).items()


def test_build_cli_takes_a_seed_and_prints_counts_out_of_n(tmp_path, monkeypatch, capsys):
    built = []

    def fake_ensure(cache_dir, recipe):
        built.append(recipe)
        card = {
            "harmful_refusal_rate": 132 / 144,
            "harmless_refusal_rate": 9 / 128,
            "matched_harmless_refusal_rate": 13 / 144,
            "counts": {
                "harmful_refusal_rate": {"refused": 132, "n": 144, "ci95": [0.86, 0.9517]}
            },  # fmt: skip
            "n_eval_by_set": {"harmless_refusal_rate": 128},  # the others: an older card
            "targets": dict.fromkeys(
                ("harmful_refusal_rate", "harmless_refusal_rate", "matched_harmless_refusal_rate"),
                ">= 0",
            ),
            "n_eval": 416,
            "build_seconds": 1.0,
            "meets_targets": True,
        }
        (tmp_path / "refuser_card.json").write_text(json.dumps(card))
        return tmp_path

    monkeypatch.setattr(refuser, "ensure_refuser", fake_ensure)
    assert refuser.main(["build", "--recipe", "v14", "--seed", "3"]) == 0
    assert built == [dataclasses.replace(refuser.RECIPES["v14"], seed=3)]
    out = capsys.readouterr().out
    assert "embedded refuser v14, seed 3:" in out
    assert "132/144 = 0.917 [0.860, 0.952]" in out
    assert "  9/128 = 0.070 [0.037, 0.128]" in out  # from the rate and n
    assert "matched_harmless_refusal_rate    0.090   target" in out  # no n recorded: the rate alone
    base = refuser.find_base_gguf()
    assert refuser.refuser_key(built[0], base) != refuser.refuser_key(refuser.RECIPES["v14"], base)


def test_v15_is_v13_with_half_weight_twins_and_the_everyday_requests():
    v13, v15 = refuser.RECIPES["v13"], refuser.RECIPES["v15"]
    assert v15.phrasing_files == (*v13.phrasing_files, EVERYDAY_FILE)
    assert (
        dataclasses.replace(
            v15, phrasing_files=v13.phrasing_files, phrasing_matched_repeats=1, version=13
        )
        == v13
    )
    harmful, harmless, repeats = refuser._training_prompts(v15)
    everyday = load_phrasing("unmatched", ("train",), v15.phrasing_families, (EVERYDAY_FILE,))
    weights = dict(zip(harmless, repeats, strict=True))
    assert len(everyday) == 81 and {weights[p] for p in everyday.prompts} == {2}
    assert harmful == refuser._training_prompts(v13)[0]  # the harmful side is v13's
    held_out = load_phrasing("unmatched", ("dev", "test"), FAMILIES, (EVERYDAY_FILE,)).prompts
    never = load_phrasing("unmatched", SPLITS, ("list",), (EVERYDAY_FILE,)).prompts
    assert held_out and never and not set(held_out + never) & set(harmless)


def test_v16_is_v15_with_v11s_build_savings():
    v15, v16 = refuser.RECIPES["v15"], refuser.RECIPES["v16"]
    assert (v16.first_trainable_layer, v16.harmless_target_tokens) == (12, 12)
    assert (v15.first_trainable_layer, v15.harmless_target_tokens) == (8, 16)
    assert (v16.first_trainable_layer, v16.harmless_target_tokens) == (
        refuser.RECIPES["v11"].first_trainable_layer,
        refuser.RECIPES["v11"].harmless_target_tokens,
    )
    same = dataclasses.replace(v16, first_trainable_layer=8, harmless_target_tokens=16, version=15)
    assert same == v15
    assert refuser._training_prompts(v16) == refuser._training_prompts(v15)  # the same data
