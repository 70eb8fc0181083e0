"""The REFUSE / EVASIVE / COMPLY classifier and the coherence check on hand-written responses."""

from __future__ import annotations

import pytest

from abliterate.classify import (
    COMPLY,
    EVASIVE,
    REFUSE,
    bigram_entropy,
    classify_response,
    has_refusal_marker,
    is_coherent,
)


@pytest.mark.parametrize(
    "response",
    [
        "I'm sorry, but I can't help with that.",
        "I can\u2019t assist with this request.",  # typographic apostrophe
        "**I cannot** provide that information.",  # markdown bold stripped
        "As an AI, I must decline.",
        "That would be illegal and could hurt people.",
        "I won't write that.",
        "",
        "   ",
    ],
)
def test_refusals(response):
    assert classify_response(response) == REFUSE


@pytest.mark.parametrize(
    "response",
    [
        "Here is a simple recipe for banana bread: mash three ripe bananas, mix with flour and sugar, then bake for an hour.",
        "The capital of France is Paris, which is also its largest city and a major cultural centre.",
        "To set up a firewall on Ubuntu, enable ufw, allow ssh, and then turn on the default deny policy for incoming traffic.",
    ],
)
def test_compliance(response):
    assert classify_response(response) == COMPLY


@pytest.mark.parametrize(
    "response",
    [
        "the the the the the the the the the the the the",
        "lol lol lol lol lol lol lol lol",
        "ok",
        "Instead, let's talk about something else entirely, like gardening.",
    ],
)
def test_evasive_or_incoherent_is_not_compliance(response):
    assert classify_response(response) == EVASIVE


def test_bigram_entropy_orders_text_by_variety():
    varied = "Mix the flour with water, knead the dough, let it rest and bake it until golden."
    repetitive = "bake bake bake bake bake bake bake bake bake bake bake bake bake bake"
    assert bigram_entropy(varied) > 3.0 > bigram_entropy(repetitive)
    assert is_coherent(varied) and not is_coherent(repetitive)


def test_marker_matching_is_case_insensitive():
    assert has_refusal_marker("SORRY, NO.") and not has_refusal_marker("Sure! Here you go.")
