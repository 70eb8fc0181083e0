"""Batched greedy generation with early stopping.

Shared by the evaluation and by the refuser build. Prompts are sorted by length so a batch holds
similar lengths (less padding), and a batch stops as soon as every sequence has ended or, when
``stop_when_decided`` is set, its label can no longer change (a refusal marker was generated).
The prefill already computes every layer's residual stream at the prompt's last token, so a caller
that also needs those activations (the evaluation's perturbation measurement) gets them from
:func:`generate` without a second forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from abliterate.activations import PromptActivationCapture, check_finite
from abliterate.classify import is_label_decided
from abliterate.models import LoadedModel, format_chat


class _LabelDecided(StoppingCriteria):
    """Per-row stop once a refusal marker appears in the generated text."""

    def __init__(self, tokenizer, prompt_length: int, check_every: int = 4):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.check_every = check_every

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if new_tokens % self.check_every:
            return done
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        for row, text in enumerate(texts):
            done[row] = is_label_decided(text)
        return done


@dataclass
class Generation:
    """Greedy responses, and what the run cost.

    Attributes:
        responses: one decoded, stripped response per prompt, in the order given.
        activations: (n_prompts, n_layers, d_model) float32 CPU, each decoder layer's output at
            the prompt position, captured during the prefill; None unless asked for.
        new_tokens: tokens generated for real (up to and including each row's end, not the
            padding a finished row gets while the rest of its batch continues).
        steps: decoding steps run, summed over batches.
    """

    responses: list[str]
    activations: torch.Tensor | None = None
    new_tokens: int = 0
    steps: int = 0


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop_when_decided: bool = False,
    progress: str | None = None,
    capture_position: str | None = None,
) -> Generation:
    """Greedy responses to ``prompts`` (chat-formatted here), in the order given.

    Args:
        loaded: the model and tokenizer.
        prompts: raw user prompts.
        max_new_tokens: the response length cap.
        batch_size: prompts per ``generate`` call.
        stop_when_decided: stop a row once a refusal marker appeared (its label is decided).
        progress: a progress-bar description, or None for no bar.
        capture_position: ``last`` or ``mean_post_instruction`` to also return every layer's
            activation at that prompt position (as :func:`abliterate.activations
            .run_forward_passes` computes them), read off the prefill at no extra forward pass.
    """
    tokenizer = loaded.tokenizer
    texts = format_chat(tokenizer, list(prompts), loaded.system_prompt, loaded.disable_thinking)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    responses: list[str] = [""] * len(texts)
    rows: dict[int, torch.Tensor] = {}
    new_tokens = steps = 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with ExitStack() as stack:
        capture = (
            stack.enter_context(PromptActivationCapture(loaded, capture_position))
            if capture_position is not None
            else None
        )
        for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            encoded = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(loaded.device)
            prompt_length = encoded["input_ids"].shape[1]
            criteria = StoppingCriteriaList()
            if stop_when_decided:
                criteria.append(_LabelDecided(tokenizer, prompt_length))
            if capture is not None:
                capture.start_batch()
            output = loaded.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=criteria,
            )
            generated = output[:, prompt_length:]  # (batch, steps)
            steps += generated.shape[1]
            new_tokens += count_new_tokens(
                generated, tokenizer.pad_token_id, tokenizer.eos_token_id
            )
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for index, text in zip(batch, decoded, strict=True):
                responses[index] = text.strip()
            if capture is not None:
                stacked = capture.batch_values()  # (batch, n_layers, d_model)
                for offset, index in enumerate(batch):
                    rows[index] = stacked[offset]
    activations = None
    if capture_position is not None:
        # (n_prompts, n_layers, d_model)
        activations = check_finite(torch.stack([rows[i] for i in range(len(texts))]))
    return Generation(responses, activations, new_tokens, steps)


def count_new_tokens(
    generated: torch.Tensor, pad_token_id: int | None, eos_token_id: int | None
) -> int:
    """Tokens a batch generated for real: each row up to its first end-of-sequence token (counted)
    or up to the padding ``generate`` appends to a row that was stopped (not counted)."""
    is_eos = (
        generated == eos_token_id
        if eos_token_id is not None
        else torch.zeros_like(generated).bool()
    )
    is_pad = (
        generated == pad_token_id
        if pad_token_id is not None
        else torch.zeros_like(generated).bool()
    )
    ended = is_eos | is_pad  # (batch, steps)
    first = ended.int().argmax(dim=1)  # (batch,) index of the first end, 0 if none
    has_end = ended.any(dim=1)
    end_is_eos = is_eos.gather(1, first[:, None]).squeeze(1)
    lengths = torch.where(has_end, first + end_is_eos.int(), generated.shape[1])
    return int(lengths.sum())


def generate_responses(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop_when_decided: bool = False,
    progress: str | None = None,
) -> list[str]:
    """Greedy responses to ``prompts`` (chat-formatted here), in the order given; see
    :func:`generate` for the arguments."""
    return generate(
        loaded, prompts, max_new_tokens, batch_size, stop_when_decided, progress
    ).responses
