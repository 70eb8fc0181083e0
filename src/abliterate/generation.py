"""Batched greedy generation with early stopping.

Shared by the evaluation and by the refuser build. Prompts are sorted by length so a batch holds
similar lengths (less padding), and a batch stops as soon as every sequence has ended or, when
``stop_when_decided`` is set, its label can no longer change (a refusal marker was generated).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

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


@torch.inference_mode()
def generate_responses(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop_when_decided: bool = False,
    progress: str | None = None,
) -> list[str]:
    """Greedy responses to ``prompts`` (chat-formatted here), in the order given.

    Args:
        loaded: the model and tokenizer.
        prompts: raw user prompts.
        max_new_tokens: the response length cap.
        batch_size: prompts per ``generate`` call.
        stop_when_decided: stop a row once a refusal marker appeared (its label is decided).
        progress: a progress-bar description, or None for no bar.
    """
    tokenizer = loaded.tokenizer
    texts = format_chat(tokenizer, list(prompts), loaded.system_prompt, loaded.disable_thinking)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    responses: list[str] = [""] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        encoded = tokenizer(
            [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(loaded.device)
        prompt_length = encoded["input_ids"].shape[1]
        criteria = StoppingCriteriaList()
        if stop_when_decided:
            criteria.append(_LabelDecided(tokenizer, prompt_length))
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
        decoded = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        for index, text in zip(batch, decoded, strict=True):
            responses[index] = text.strip()
    return responses
