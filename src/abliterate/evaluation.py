"""Evaluation: refusals on held-out harmful prompts, false refusals on harmless ones, and KL.

- Greedy responses (batched, stopping early once every label is decided) are labelled
  REFUSE / EVASIVE / COMPLY by :mod:`abliterate.classify`.
- KL(original || ablated) is teacher-forced over ``kl_tokens`` tokens of the original model's
  greedy continuation of harmless prompts (one forward pass per batch, no generation), averaged
  over real (non-padding) positions. With
  ``kl_top_k`` set, both distributions are coarse-grained to the original's top-k tokens plus one
  tail bucket (an exact KL of the coarse distributions, and a lower bound of the full one), which
  keeps the stored reference small for long continuations (Petrov: top-100).
- The unedited model's evaluation (its responses, labels, rates, the KL reference and the harmful
  prompts' activations) is computed once per model x prompts x settings and cached on disk, so no
  trial recomputes it.
- The harmful prompts' residual activations (for the perturbation ratio) are read off the prefill
  of the harmful set's generation, so measuring them costs no forward pass of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from abliterate.classify import COMPLY, EVASIVE, REFUSE, CoherenceThresholds, classify_response
from abliterate.generation import generate
from abliterate.models import LoadedModel, format_chat
from abliterate.prompts import PromptSet

log = logging.getLogger(__name__)

EVAL_SETS = ("harmful", "unmatched", "matched")


@dataclass
class EvalPrompts:
    """The held-out prompts one evaluation uses."""

    harmful: PromptSet
    unmatched: PromptSet
    matched: PromptSet
    kl: PromptSet

    def fingerprint(self) -> str:
        return hashlib.sha256(
            "|".join(
                s.fingerprint() for s in (self.harmful, self.unmatched, self.matched, self.kl)
            ).encode()
        ).hexdigest()[:16]


def select_eval_prompts(
    harmful: PromptSet, unmatched: PromptSet, matched: PromptSet, cfg: Any
) -> EvalPrompts:
    """Stratified held-out subsets sized by the ``eval`` config.

    KL prompts are the unmatched evaluation prompts after those used for false refusals, so the
    two measurements do not share prompts when the pool is large enough.
    """
    n_unmatched = min(cfg.n_unmatched, len(unmatched))
    kl_pool = unmatched.prompts[n_unmatched:] or unmatched.prompts
    kl = PromptSet("kl", tuple(kl_pool[: cfg.kl_prompts]))
    return EvalPrompts(
        harmful=harmful.select(per_category=cfg.harmful_per_category, limit=cfg.n_harmful),
        unmatched=unmatched.select(limit=n_unmatched),
        matched=matched.select(limit=cfg.n_matched),
        kl=kl,
    )


@dataclass
class SetResult:
    """Responses and labels for one prompt set."""

    prompts: list[str]
    categories: list[str | None]
    responses: list[str]
    labels: list[str]
    # (n, n_layers, d_model) float32: every layer's output at the prompt position, from the
    # generation's prefill; only for a set evaluated with capture_position
    activations: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def texts(self) -> dict[str, list]:
        """The JSON-serialisable part (the cache's sets.json)."""
        return {
            "prompts": self.prompts,
            "categories": self.categories,
            "responses": self.responses,
            "labels": self.labels,
        }

    def rate(self, label: str) -> float:
        return sum(lab == label for lab in self.labels) / max(1, len(self.labels))

    def rate_by_category(self, label: str = REFUSE) -> dict[str, float]:
        rates: dict[str, list[int]] = {}
        for category, lab in zip(self.categories, self.labels, strict=True):
            rates.setdefault(category or "", []).append(int(lab == label))
        return {category: sum(v) / len(v) for category, v in rates.items()}


@dataclass
class KLReference:
    """What KL needs from the original model: the teacher-forcing inputs and its log-probs."""

    input_ids: torch.Tensor  # (n, seq) prompt + greedy continuation, left-padded
    attention_mask: torch.Tensor  # (n, seq)
    positions_mask: torch.Tensor  # (n, kl_tokens) bool: which continuation positions are real
    log_probs: torch.Tensor  # (n, kl_tokens, vocab or top_k + 1) float32
    top_indices: torch.Tensor | None  # (n, kl_tokens, top_k) when coarse-grained

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "positions_mask": self.positions_mask,
            "log_probs": self.log_probs,
        }
        if self.top_indices is not None:
            named["top_indices"] = self.top_indices
        return named


@dataclass
class EvalResult:
    sets: dict[str, SetResult]
    kl_log_probs: torch.Tensor | None = None  # only the reference keeps these
    extra: dict[str, Any] = field(default_factory=dict)


def evaluate_responses(
    loaded: LoadedModel, prompts: EvalPrompts, cfg: Any, capture_position: str | None = None
) -> dict[str, SetResult]:
    """Greedy responses and labels on the harmful, unmatched and matched held-out sets.

    The three sets are generated together (one length-sorted run, ``loaded.batch_size`` prompts
    per batch): on a GPU a decoding step costs about the same for 30 rows as for 100, so one
    batch of all of them takes a third of the steps of three.

    Args:
        capture_position: ``last`` or ``mean_post_instruction`` to also keep the harmful prompts'
            activations (``sets["harmful"].activations``), read off the generation's prefill.
    """
    thresholds = CoherenceThresholds(cfg.min_bigram_entropy, cfg.max_repeat_fraction)
    prompt_sets = [getattr(prompts, name) for name in EVAL_SETS]
    generation = generate(
        loaded,
        [prompt for prompt_set in prompt_sets for prompt in prompt_set.prompts],
        cfg.max_new_tokens,
        loaded.batch_size,
        stop_when_decided=cfg.early_stop,
        capture_position=capture_position,
    )
    results, start = {}, 0
    for name, prompt_set in zip(EVAL_SETS, prompt_sets, strict=True):
        rows = slice(start, start + len(prompt_set))
        start = rows.stop
        responses = generation.responses[rows]
        activations = None
        if name == "harmful" and generation.activations is not None:
            activations = generation.activations[rows]  # (n_harmful, n_layers, d_model)
        results[name] = SetResult(
            list(prompt_set.prompts),
            list(prompt_set.categories),
            responses,
            [classify_response(response, thresholds) for response in responses],
            activations,
        )
    return results


def _row_batches(n_rows: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n_rows)) for i in range(0, n_rows, batch_size)]


def _continuation_inputs(
    loaded: LoadedModel, prompts: PromptSet, kl_tokens: int
) -> tuple[torch.Tensor, ...]:
    """Prompt + the original's greedy continuation (``kl_tokens`` tokens), left-padded.

    All rows share one padded width (the reference is one tensor); they are run
    ``loaded.batch_size`` at a time, here and in every KL measurement, so the reference and the
    ablated model see the same batches.
    """
    tokenizer = loaded.tokenizer
    texts = format_chat(
        tokenizer, list(prompts.prompts), loaded.system_prompt, loaded.disable_thinking
    )
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
        loaded.device
    )
    continuations = []
    with torch.inference_mode():
        for rows in _row_batches(len(texts), loaded.batch_size):
            output = loaded.model.generate(
                input_ids=encoded["input_ids"][rows],
                attention_mask=encoded["attention_mask"][rows],
                max_new_tokens=kl_tokens,
                min_new_tokens=kl_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            continuations.append(output[:, encoded["input_ids"].shape[1] :])
    continuation = torch.cat(continuations)  # (n, kl_tokens)
    input_ids = torch.cat([encoded["input_ids"], continuation[:, :-1]], dim=1)
    attention_mask = torch.cat(
        [encoded["attention_mask"], torch.ones_like(continuation[:, :-1])], dim=1
    )
    return input_ids.cpu(), attention_mask.cpu()


@torch.inference_mode()
def _continuation_log_probs(
    loaded: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, kl_tokens: int
) -> torch.Tensor:
    """Log-probs at the ``kl_tokens`` positions that predict the continuation: (n, kl_tokens, vocab)."""
    output = loaded.model(
        input_ids=input_ids.to(loaded.device),
        attention_mask=attention_mask.to(loaded.device),
        use_cache=False,
        logits_to_keep=kl_tokens,
    )
    return torch.log_softmax(output.logits[:, -kl_tokens:].float(), dim=-1).cpu()


def _coarse_grain(log_probs: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    """Log-probs of the chosen tokens plus one tail bucket: (..., top_k + 1)."""
    top = log_probs.gather(-1, top_indices)
    tail_mass = (1.0 - top.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
    return torch.cat([top, tail_mass.log()], dim=-1)


def compute_kl_reference(
    loaded: LoadedModel, prompts: PromptSet, kl_tokens: int, top_k: int | None
) -> KLReference:
    input_ids, attention_mask = _continuation_inputs(loaded, prompts, kl_tokens)
    # one batch at a time, coarse-grained before the next, so the full-vocabulary log-probs of
    # only one batch are ever held (100 prompts x 50 tokens x 248k vocabulary would be 5 GB)
    log_probs_parts, top_parts = [], []
    for rows in _row_batches(len(input_ids), loaded.batch_size):
        batch_log_probs = _continuation_log_probs(
            loaded, input_ids[rows], attention_mask[rows], kl_tokens
        )  # (batch, kl_tokens, vocab)
        if top_k is not None and top_k < batch_log_probs.shape[-1]:
            batch_top = batch_log_probs.topk(top_k, dim=-1).indices
            batch_log_probs = _coarse_grain(batch_log_probs, batch_top)
            top_parts.append(batch_top)
        log_probs_parts.append(batch_log_probs)
    log_probs = torch.cat(log_probs_parts)  # (n, kl_tokens, vocab or top_k + 1)
    top_indices = torch.cat(top_parts) if top_parts else None
    # Position j predicts continuation token j+1; it is real text only if the original had not
    # ended (generated its end-of-turn token) among the tokens before it.
    positions_mask = torch.ones((len(input_ids), kl_tokens), dtype=torch.bool)
    if kl_tokens > 1:
        fed_continuation = input_ids[:, -(kl_tokens - 1) :]  # (n, kl_tokens - 1)
        ended = torch.cumsum((fed_continuation == loaded.tokenizer.eos_token_id).int(), dim=1) > 0
        positions_mask[:, 1:] = ~ended
    return KLReference(input_ids, attention_mask, positions_mask, log_probs, top_indices)


def compute_kl(loaded: LoadedModel, reference: KLReference) -> float:
    """Mean KL(original || current model) per real continuation position (nats).

    One teacher-forced forward pass per batch over the stored prompt + continuation: no
    generation, and only the ``kl_tokens`` positions' logits are computed.
    """
    kl_tokens = reference.positions_mask.shape[1]
    mask = reference.positions_mask
    total = torch.zeros((), dtype=torch.float64)
    for rows in _row_batches(len(reference.input_ids), loaded.batch_size):
        current = _continuation_log_probs(
            loaded, reference.input_ids[rows], reference.attention_mask[rows], kl_tokens
        )
        if reference.top_indices is not None:
            current = _coarse_grain(current, reference.top_indices[rows])
        original = reference.log_probs[rows]
        per_position = (original.exp() * (original - current)).sum(-1)  # (batch, kl_tokens)
        total += (per_position * mask[rows]).double().sum()
    return float(total / mask.sum().clamp_min(1))


@dataclass
class BaselineEvaluation:
    """The unedited model's evaluation, computed once and shared by every trial."""

    sets: dict[str, SetResult]
    kl_reference: KLReference
    cache_hit: bool = False

    @property
    def harmful_activations(self) -> torch.Tensor | None:
        """(n_harmful, n_layers, d_model): the unedited model's activations on the harmful set."""
        return self.sets["harmful"].activations

    def rates(self) -> dict[str, float]:
        return {
            "refusal_rate": self.sets["harmful"].rate(REFUSE),
            "harmless_refusal_rate": self.sets["unmatched"].rate(REFUSE),
            "matched_harmless_refusal_rate": self.sets["matched"].rate(REFUSE),
        }


def baseline_eval_key(
    loaded: LoadedModel, prompts: EvalPrompts, cfg: Any, capture_position: str | None = None
) -> str:
    from abliterate.activations import template_fingerprint

    settings = {
        # batches change padding, and padding changes the last bits of every number
        "batch_size": loaded.batch_size,
        "capture_position": capture_position,
        "model": loaded.identity,
        "dtype": str(next(loaded.model.parameters()).dtype),
        "prompts": prompts.fingerprint(),
        "template": template_fingerprint(loaded),
        "max_new_tokens": cfg.max_new_tokens,
        "kl_tokens": cfg.kl_tokens,
        "kl_top_k": cfg.kl_top_k,
        "coherence": [cfg.min_bigram_entropy, cfg.max_repeat_fraction],
        "early_stop": cfg.early_stop,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _load_baseline(directory: Path) -> BaselineEvaluation | None:
    """The cached entry, or None if it is missing, damaged or of another format."""
    try:
        payload = json.loads((directory / "sets.json").read_text())
        tensors = load_file(str(directory / "kl_reference.safetensors"))
        sets = {name: SetResult(**values) for name, values in payload["sets"].items()}
        sets["harmful"].activations = tensors.get("harmful_activations")
        reference = KLReference(
            tensors["input_ids"],
            tensors["attention_mask"],
            tensors["positions_mask"].bool(),
            tensors["log_probs"],
            tensors.get("top_indices"),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        if directory.exists():
            log.warning(
                "baseline evaluation cache %s is unreadable (%s); recomputing", directory, error
            )
        return None
    return BaselineEvaluation(sets, reference, cache_hit=True)


def _store_baseline(directory: Path, baseline: BaselineEvaluation) -> None:
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in baseline.kl_reference.tensors().items()}
    tensors["positions_mask"] = tensors["positions_mask"].to(torch.uint8)
    if baseline.harmful_activations is not None:
        tensors["harmful_activations"] = baseline.harmful_activations.contiguous()
    save_file(tensors, str(staging / "kl_reference.safetensors"))
    (staging / "sets.json").write_text(
        json.dumps({"sets": {k: v.texts() for k, v in baseline.sets.items()}})
    )
    if directory.exists():  # an unreadable entry (the caller holds the entry's lock)
        stale = directory.with_name(f"{directory.name}.stale-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(staging, directory)  # atomic: never half-written under the real name


def evaluate_baseline(
    loaded: LoadedModel,
    prompts: EvalPrompts,
    cfg: Any,
    cache_dir: str | Path | None,
    capture_position: str | None = None,
) -> BaselineEvaluation:
    """The unedited model's evaluation, from the cache when present.

    Args:
        capture_position: also keep the harmful prompts' activations at this position (see
            :func:`evaluate_responses`); part of the cache key.
    """

    def compute() -> BaselineEvaluation:
        sets = evaluate_responses(loaded, prompts, cfg, capture_position)
        reference = compute_kl_reference(loaded, prompts.kl, cfg.kl_tokens, cfg.kl_top_k)
        return BaselineEvaluation(sets, reference)

    if cache_dir is None:
        return compute()
    root = Path(cache_dir) / "baseline_eval"
    root.mkdir(parents=True, exist_ok=True)
    key = baseline_eval_key(loaded, prompts, cfg, capture_position)
    directory = root / key
    cached = _load_baseline(directory)
    if cached is not None:
        return cached
    with FileLock(str(root / f"{key}.lock")):
        cached = _load_baseline(directory)
        if cached is not None:
            return cached
        baseline = compute()
        _store_baseline(directory, baseline)
    return baseline


def summarize_evaluation(
    sets: dict[str, SetResult], kl: float, baseline: BaselineEvaluation, cfg: Any
) -> dict[str, Any]:
    """The ``eval`` block of results.json."""
    harmful = sets["harmful"]
    refusals = sum(label == REFUSE for label in harmful.labels)
    baseline_refusals = sum(label == REFUSE for label in baseline.sets["harmful"].labels)
    return {
        "n_harmful": len(harmful.labels),
        "refusals": refusals,
        "baseline_refusals": baseline_refusals,
        "refusal_rate": harmful.rate(REFUSE),
        "evasive_rate": harmful.rate(EVASIVE),
        "comply_rate": harmful.rate(COMPLY),
        "refusal_rate_by_category": harmful.rate_by_category(REFUSE),
        "harmless_refusal_rate": sets["unmatched"].rate(REFUSE),
        "matched_harmless_refusal_rate": sets["matched"].rate(REFUSE),
        "harmless_evasive_rate": sets["unmatched"].rate(EVASIVE),
        "kl_divergence": kl,
        "kl_tokens": cfg.kl_tokens,
        "kl_top_k": cfg.kl_top_k,
        # refusals removed (a count, as Petrov's R) per nat of KL, KL floored to avoid dividing by ~0
        "efficiency": (baseline_refusals - refusals) / max(kl, cfg.kl_floor),
    }
