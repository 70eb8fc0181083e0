"""Batched greedy generation with early stopping.

Shared by the evaluation and by the refuser build. Prompts are sorted by length so a batch holds
similar lengths (less padding), and a row stops as soon as it has ended or, when
``stop_when_decided`` is given, its label can no longer change (the judge says so: a judge that
reads the whole response never does, so early stopping never changes a label).
The prefill already computes every layer's residual stream at the prompt's last token, so a caller
that also needs those activations (the evaluation's perturbation measurement) gets them from
:func:`generate` without a second forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from abliterate.activations import PromptActivationCapture, check_finite
from abliterate.classify import is_label_decided
from abliterate.models import LoadedModel
from abliterate.templates import format_chat

# Drop finished rows from a batch once this share of them is done (a refusing row is decided a
# few tokens in). The gain depends on how a step's cost grows with its rows: on the 2-core CPU
# a 4-row step costs 0.75-0.9 of a 32-row one (benchmarks/decode_profile.py), so it saved 3% of
# the unedited model's evaluation there; it saves most where rows are expensive.
COMPACT_FRACTION = 0.25
_MIN_STEPS_LEFT_TO_COMPACT = 4  # fewer steps left: not worth another generate call


class _RowStops(StoppingCriteria):
    """Which rows of a ``generate`` call are done, and when to end the call to drop them.

    A row is done once it generated an end-of-sequence token or, with ``is_decided``, once its
    label can no longer change (``is_decided(prompt, text so far)``, the judge's own answer;
    checked every ``check_every`` new tokens). ``generate`` pads a done row while the others continue; when
    ``compact_after`` rows are done and enough steps remain, the call ends for every row so that
    the caller can continue the rest without the done ones (``self.done`` says which).
    """

    def __init__(
        self,
        tokenizer,
        end_ids: torch.Tensor,
        prompt_length: int,
        prompts: Sequence[str],
        steps_left: int,
        is_decided: Callable[[str, str], bool] | None,
        compact_after: int,
        check_every: int = 2,
    ):
        self.tokenizer = tokenizer
        self.end_ids = end_ids
        self.prompt_length = prompt_length
        self.prompts = list(prompts)  # the raw prompt of each row
        self.steps_left = steps_left
        self.is_decided = is_decided
        n_rows = len(self.prompts)
        self.compact_after = compact_after
        self.check_every = check_every
        self.done = torch.zeros(n_rows, dtype=torch.bool)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        self.done |= torch.isin(input_ids[:, -1].cpu(), self.end_ids)
        new_tokens = input_ids.shape[1] - self.prompt_length
        if self.is_decided is not None and new_tokens % self.check_every == 0:
            pending = (~self.done).nonzero().flatten()
            texts = self.tokenizer.batch_decode(
                input_ids[pending.to(input_ids.device), self.prompt_length :],
                skip_special_tokens=True,
            )
            for row, text in zip(pending.tolist(), texts, strict=True):
                self.done[row] = self.is_decided(self.prompts[row], text.strip())
        compact = (
            int(self.done.sum()) >= self.compact_after
            and self.steps_left - self.steps >= _MIN_STEPS_LEFT_TO_COMPACT
        )
        stop = torch.ones_like(self.done) if compact else self.done
        return stop.to(input_ids.device)  # type: ignore[return-value]


@dataclass
class Generation:
    """Greedy responses, and what the run cost.

    Attributes:
        responses: one decoded, stripped response per prompt, in the order given.
        activations: (n_prompts, n_layers, d_model) float32 CPU, each decoder layer's output at
            the prompt position, captured during the prefill; None unless asked for.
        new_tokens: tokens generated for real (up to and including each row's end, not the
            padding a finished row gets while the rest of its batch continues).
        row_steps: token positions decoded, summed over rows, calls and batches (padding of
            done rows still in a batch included): the decoding work done.
    """

    responses: list[str]
    activations: torch.Tensor | None = None
    new_tokens: int = 0
    row_steps: int = 0


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop_when_decided: bool | Callable[[str, str], bool] = False,
    progress: str | None = None,
    capture_position: str | None = None,
) -> Generation:
    """Greedy responses to ``prompts`` (chat-formatted here), in the order given.

    Args:
        loaded: the model and tokenizer.
        prompts: raw user prompts.
        max_new_tokens: the response length cap.
        batch_size: prompts per ``generate`` call.
        stop_when_decided: ``is_decided(prompt, response so far)``, a judge's answer to whether
            more tokens can still change the row's label (``Judge.is_decided``): the row stops
            once it is True. ``True`` uses the refusal-marker rule (a marker appeared), which is
            exact only for a marker-based labeller (the refuser build's).
        progress: a progress-bar description, or None for no bar.
        capture_position: ``last`` or ``mean_post_instruction`` to also return every layer's
            activation at that prompt position (as :func:`abliterate.activations
            .run_forward_passes` computes them), read off the prefill at no extra forward pass.
    """
    tokenizer = loaded.tokenizer
    is_decided: Callable[[str, str], bool] | None = None
    if callable(stop_when_decided):
        is_decided = stop_when_decided
    elif stop_when_decided:
        is_decided = _marker_decided
    texts = format_chat(tokenizer, list(prompts), loaded.system_prompt, loaded.disable_thinking)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    responses: list[str] = [""] * len(texts)
    rows: dict[int, torch.Tensor] = {}
    new_tokens = row_steps = 0
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
            if capture is not None:
                capture.start_batch()  # the first forward below is the prefill
            generated, batch_row_steps = _generate_batch(
                loaded, encoded["input_ids"], encoded["attention_mask"], max_new_tokens,
                [prompts[i] for i in batch], is_decided,
            )  # fmt: skip
            row_steps += batch_row_steps
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
    return Generation(responses, activations, new_tokens, row_steps)


def end_token_ids(loaded: LoadedModel) -> torch.Tensor:
    """Every id that ends a response: the tokenizer's end-of-sequence token and each of the
    generation config's ``eos_token_id`` (one id or a list), as a sorted 1-D long tensor."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = loaded.model.generation_config.eos_token_id
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def _generate_batch(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    prompts: Sequence[str],
    is_decided: Callable[[str, str], bool] | None,
) -> tuple[torch.Tensor, int]:
    """Greedy continuation of one left-padded batch, dropping rows as they finish.

    ``generate`` runs until every row is done, computing padding for the done ones; here it is
    ended once ``COMPACT_FRACTION`` of the rows are done, those rows are dropped from the batch
    and from its key/value cache (``Cache.reorder_cache`` with the remaining rows), and the rest
    continue from the cache in a new call: nothing is recomputed, and each row's tokens are those
    of one uninterrupted greedy run.

    Returns:
        (rows, steps) generated token ids, padded after each row's end; the token positions
        decoded (rows x steps, summed over the calls).
    """
    tokenizer, model = loaded.tokenizer, loaded.model
    pad_id = tokenizer.pad_token_id
    end_ids = end_token_ids(loaded)
    prompt_length = input_ids.shape[1]
    generated = torch.full(
        (len(input_ids), max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device
    )
    rows = torch.arange(len(input_ids), device=input_ids.device)  # the batch's rows still going
    cache = None
    produced = row_steps = 0
    while len(rows) and produced < max_new_tokens:
        stops = _RowStops(
            tokenizer,
            end_ids,
            prompt_length,
            [prompts[row] for row in rows.tolist()],
            max_new_tokens - produced,
            is_decided,
            compact_after=max(1, math.ceil(COMPACT_FRACTION * len(rows))),
        )
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            max_new_tokens=max_new_tokens - produced,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            stopping_criteria=StoppingCriteriaList([stops]),
            return_dict_in_generate=True,
        )
        sequences = output.sequences  # (rows, previous length + new)
        new = sequences.shape[1] - input_ids.shape[1]
        generated[rows, produced : produced + new] = sequences[:, input_ids.shape[1] :]
        produced += new
        row_steps += len(rows) * new
        keep = (~stops.done).nonzero().flatten().to(input_ids.device)
        cache = output.cache
        if len(keep) == len(rows):
            break  # ran to the end
        if hasattr(cache, "reorder_cache"):
            cache.reorder_cache(keep)  # keep only these rows' keys, values and recurrent states
        else:
            cache = None  # a legacy cache cannot drop rows: the rest re-read their prefix
        input_ids = sequences[keep]
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((len(attention_mask), new))], dim=1
        )[keep]
        rows = rows[keep]
    return generated[:, :produced].cpu(), row_steps


def _marker_decided(prompt: str, text: str) -> bool:
    return is_label_decided(text)


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
