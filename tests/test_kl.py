"""KL over k tokens against a hand computation on tiny models.

The original model's greedy continuation ends where the original ends it; KL(original || edited)
is averaged over the positions that predict each continuation token up to and including the end
token, and nothing after it. The hand computation runs each row unpadded through full forward
passes and picks the logits that predict each continuation token.
"""

from __future__ import annotations

import pytest
import torch

from abliterate.evaluation import (
    KLReference,
    compute_kl,
    compute_kl_reference,
    continuation_positions_mask,
)
from abliterate.generation import end_token_ids
from abliterate.prompts import PromptSet
from abliterate.templates import format_chat

# lengths 2, 3, 4, 5, 12 and 14 characters (one token each): with K = 6 and the end forced at a
# fixed position, they run all 6 tokens, end at the 6th, 5th, 4th, and end at once (twice)
PROMPTS = PromptSet("kl", ("name a fruit", "hi", "sing", "count to three", "hello", "hey"))
K = 6  # kl_tokens
FAMILY = "qwen3"


def _prompt_ids(loaded) -> list[torch.Tensor]:
    texts = format_chat(loaded.tokenizer, list(PROMPTS.prompts))
    return [
        torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in texts
    ]


@torch.no_grad()
def _last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def _hand_greedy(model, prompt: torch.Tensor, eos: int) -> list[int]:
    """Greedy continuation of one unpadded prompt: up to K tokens, ending at eos."""
    ids, tokens = prompt.tolist(), []
    for _ in range(K):
        token = int(_last_logits(model, ids + tokens).argmax())
        tokens.append(token)
        if token == eos:
            break
    return tokens


class EndsAtPosition:
    """A forward hook that makes the model end its response: from sequence position ``at`` on
    (counted without padding, as ``generate`` counts it) the eos logit is raised far above the
    rest. Prompts of different lengths therefore end after different numbers of tokens."""

    def __init__(self, eos: int, at: int):
        self.eos, self.at = eos, at

    def __call__(self, module, args, kwargs, output):
        logits = output.logits  # (batch, kept positions, vocab)
        positions = kwargs.get("position_ids")
        if positions is None and kwargs.get("attention_mask") is not None:
            positions = kwargs["attention_mask"].long().cumsum(-1) - 1
        if positions is None:
            positions = torch.arange(kwargs["input_ids"].shape[1])[None]
        positions = positions[:, -logits.shape[1] :]  # the positions whose logits were kept
        raise_eos = torch.zeros(logits.shape[-1])
        raise_eos[self.eos] = 100.0
        output.logits = logits + (positions >= self.at)[..., None] * raise_eos
        return output


def _coarse(log_probs: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    chosen = log_probs[top]
    tail = (1 - chosen.exp().sum()).clamp_min(1e-12).log()
    return torch.cat([chosen, tail[None]])


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    return float((p_log.exp() * (p_log - q_log)).sum())


@torch.no_grad()
def _hand_kl(original, edited, top_k: int | None) -> tuple[float, float, list[list[int]]]:
    """Mean KL(original || edited) and KL(edited || original) over real positions, computed row
    by row without padding, and each row's continuation."""
    eos = original.tokenizer.eos_token_id
    forward, reverse, continuations = [], [], []
    for prompt in _prompt_ids(original):
        tokens = _hand_greedy(original.model, prompt, eos)  # ends at eos or after K tokens
        continuations.append(tokens)
        ids = torch.cat([prompt, torch.tensor(tokens)])[None]
        first = len(prompt) - 1  # the last prompt token's logits predict continuation token 0
        rows = slice(first, first + len(tokens))  # one position per continuation token, end incl.
        p_all = torch.log_softmax(original.model(input_ids=ids).logits[0, rows].float(), -1)
        q_all = torch.log_softmax(edited.model(input_ids=ids).logits[0, rows].float(), -1)
        for p, q in zip(p_all, q_all, strict=True):
            if top_k is not None:
                top = p.topk(top_k).indices
                p, q = _coarse(p, top), _coarse(q, top)
            forward.append(_kl(p, q))
            reverse.append(_kl(q, p))
    return sum(forward) / len(forward), sum(reverse) / len(reverse), continuations


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("batch_size", [2, len(PROMPTS)])
def test_compute_kl_equals_a_hand_computation(tiny_loaded, top_k, batch_size):
    original = tiny_loaded(FAMILY)
    edited = tiny_loaded(FAMILY, seed=1)  # another model with the same tokenizer plays the edit
    original.batch_size = edited.batch_size = batch_size
    eos = original.tokenizer.eos_token_id
    # the shortest prompt runs all K tokens; a prompt d tokens longer ends at token K - d
    # (d = 1: its K-th token is the end; d >= K: it ends at once)
    shortest = min(len(ids) for ids in _prompt_ids(original))
    hook = EndsAtPosition(eos, at=shortest + K - 1)
    handle = original.model.register_forward_hook(hook, with_kwargs=True)
    try:
        reference = compute_kl_reference(original, PROMPTS, kl_tokens=K, top_k=top_k)
        forward, reverse, continuations = _hand_kl(original, edited, top_k)
        assert compute_kl(original, reference) == pytest.approx(0.0, abs=1e-6)
    finally:
        handle.remove()

    # the continuation ends where the original ends it; the mask keeps the end's position
    lengths = [len(tokens) for tokens in continuations]
    assert sorted(lengths) == [1, 1, 4, 5, 6, 6]
    assert [tokens[-1] == eos for tokens in continuations] == [True, False, True, True, True, True]
    expected_mask = torch.tensor([[j < n for j in range(K)] for n in lengths])
    assert torch.equal(reference.positions_mask, expected_mask)
    for row, tokens in enumerate(continuations):
        fed = reference.input_ids[row, -(K - 1) :].tolist()  # continuation tokens 0..K-2
        assert fed[: min(len(tokens), K - 1)] == tokens[: K - 1]
        if tokens[-1] == eos:
            assert reference.positions_mask[row, len(tokens) - 1]  # the end's position is real
    width = original.model.config.vocab_size if top_k is None else top_k + 1
    assert reference.log_probs.shape == (len(PROMPTS), K, width)

    # direction and value: KL(original || edited), averaged over the real positions only
    kl = compute_kl(edited, reference)
    assert abs(forward - reverse) > 0.05 * forward  # the two directions are told apart
    assert kl == pytest.approx(forward, rel=1e-4)


def test_positions_after_any_end_id_are_masked():
    end_ids = torch.tensor([2, 7])
    continuation = torch.tensor(
        [
            [5, 6, 2, 0, 0],  # ends at 2: positions 0-2 real (2 predicts the end)
            [7, 0, 0, 0, 0],  # ends at once with the second end id
            [5, 6, 8, 9, 4],  # never ends
            [5, 2, 7, 2, 0],  # only the first end counts
        ]
    )
    mask = continuation_positions_mask(continuation, end_ids)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True] * 5,
        [True, True, False, False, False],
    ]


def test_masked_positions_count_for_nothing(tiny_loaded):
    """A hand-made reference: garbage after the mask changes nothing, and the mean is over the
    real positions (not over all of them)."""
    loaded = tiny_loaded(FAMILY)
    edited = tiny_loaded(FAMILY, seed=1)
    reference = compute_kl_reference(loaded, PROMPTS, kl_tokens=K, top_k=None)
    mask = torch.zeros_like(reference.positions_mask)
    mask[:, :2] = True  # pretend every row ended at its second token
    kept = KLReference(
        reference.input_ids, reference.attention_mask, mask, reference.log_probs, None
    )
    spoiled_log_probs = reference.log_probs.clone()
    spoiled_log_probs[:, 2:] = torch.log_softmax(torch.randn_like(spoiled_log_probs[:, 2:]), -1)
    spoiled = KLReference(
        reference.input_ids, reference.attention_mask, mask, spoiled_log_probs, None
    )
    kl = compute_kl(edited, kept)
    assert compute_kl(edited, spoiled) == pytest.approx(kl, rel=1e-6)
    with torch.no_grad():
        current = torch.log_softmax(
            edited.model(
                input_ids=reference.input_ids, attention_mask=reference.attention_mask
            ).logits[:, -K:],
            -1,
        )
    original = reference.log_probs
    per_position = (original.exp() * (original - current)).sum(-1)
    assert kl == pytest.approx(float(per_position[:, :2].mean()), rel=1e-4)


def test_end_token_ids_include_the_generation_configs_list(tiny_loaded):
    loaded = tiny_loaded(FAMILY)
    loaded.model.generation_config.eos_token_id = [5, loaded.tokenizer.eos_token_id]
    assert end_token_ids(loaded).tolist() == sorted({5, loaded.tokenizer.eos_token_id})
