"""Evaluation: refusals on held-out harmful prompts, false refusals on harmless ones, and KL.

- Greedy responses (batched; a row stops early only once the judge says no later token can
  change its label) are labelled REFUSE / EVASIVE / COMPLY / INCOHERENT by the trial's judge
  (:mod:`abliterate.judge`), in one batched call after generation.
- KL(original || ablated) is teacher-forced over up to ``kl_tokens`` tokens of the original
  model's greedy continuation of harmless prompts (one forward pass per batch, no generation).
  The continuation ends where the original ends it (any of its end ids); the mean is over the
  positions that predict each continuation token up to and including the end token, never the
  padding after it. With
  ``kl_top_k`` set, both distributions are coarse-grained to the original's top-k tokens plus one
  tail bucket (an exact KL of the coarse distributions, and a lower bound of the full one), which
  keeps the stored reference small for long continuations (Petrov: top-100).
- The unedited model's evaluation (its responses, labels, rates, the KL reference and the harmful
  and matched prompts' activations) is computed once per model x prompts x settings x judge and
  cached on disk, so no trial recomputes it.
- The harmful and matched prompts' residual activations (for the perturbation ratio and the
  behavioural capture) are read off the prefill of the generation, so measuring them costs no
  forward pass of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from abliterate.cache import DiskCache, content_key
from abliterate.config import ConfigError
from abliterate.generation import end_token_ids, generate
from abliterate.judge import COMPLY, EVASIVE, INCOHERENT, OUTCOMES, REFUSE, Judge, build_judge
from abliterate.models import LoadedModel
from abliterate.prompts import PromptSet
from abliterate.provenance import digest
from abliterate.stats import rate_record
from abliterate.templates import format_chat

log = logging.getLogger(__name__)

EVAL_SETS = ("harmful", "unmatched", "matched")
# sets whose prompt activations an evaluation keeps (perturbation, behavioural capture)
ACTIVATION_SETS = ("harmful", "matched")


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


def _too_small(key: str, asked: int, what: str, available: int) -> ConfigError:
    return ConfigError(
        f"{key}={asked} asks for {asked} {what} but only {available} are available; lower "
        f"{key} or use a larger prompt set"
    )


def select_eval_prompts(
    harmful: PromptSet, unmatched: PromptSet, matched: PromptSet, cfg: Any
) -> EvalPrompts:
    """Stratified held-out subsets sized by the ``eval`` config, checked before any model loads.

    - harmful: at most ``harmful_per_category`` per category, then ``n_harmful`` in all (when
      set), taken round-robin over the categories;
    - unmatched (false refusals): the first ``n_unmatched`` unmatched evaluation prompts;
    - matched: ``n_matched`` topic-matched prompts, round-robin over the categories;
    - KL: the ``kl_prompts`` unmatched evaluation prompts after the false-refusal ones, so the two
      measurements never share a prompt.

    Call it as soon as the prompt sets are loaded: it is the one place that checks the sizes.

    Raises:
        ConfigError: a set is smaller than asked (one line naming the ``eval`` key, the number
            asked and the number available); never a silent truncation.
    """
    groups = len(harmful.by_category())
    selected_harmful = harmful.select(per_category=cfg.harmful_per_category, limit=cfg.n_harmful)
    if cfg.n_harmful is not None:
        if len(selected_harmful) < cfg.n_harmful:
            raise ConfigError(
                f"eval.n_harmful={cfg.n_harmful} asks for {cfg.n_harmful} harmful evaluation "
                f"prompts but only {len(selected_harmful)} are available (at most "
                f"eval.harmful_per_category={cfg.harmful_per_category} from each of {groups} "
                f"categories of prompt set {harmful.name!r}, which holds {len(harmful)})"
            )
    else:
        short = {
            category or "(uncategorised)": len(prompts)
            for category, prompts in harmful.by_category().items()
            if len(prompts) < cfg.harmful_per_category
        }
        if short or not len(harmful):
            raise ConfigError(
                f"eval.harmful_per_category={cfg.harmful_per_category} asks for "
                f"{cfg.harmful_per_category} harmful evaluation prompts per category but "
                f"prompt set {harmful.name!r} has fewer: {short or 'it is empty'}"
            )
    if cfg.n_unmatched > len(unmatched):
        raise _too_small(
            "eval.n_unmatched",
            cfg.n_unmatched,
            f"prompts of prompt set {unmatched.name!r}",
            len(unmatched),
        )
    if cfg.n_matched > len(matched):
        raise _too_small(
            "eval.n_matched", cfg.n_matched, f"prompts of prompt set {matched.name!r}", len(matched)
        )
    if cfg.n_unmatched + cfg.kl_prompts > len(unmatched):
        raise ConfigError(
            f"eval.n_unmatched={cfg.n_unmatched} false-refusal prompts plus "
            f"eval.kl_prompts={cfg.kl_prompts} KL prompts need "
            f"{cfg.n_unmatched + cfg.kl_prompts} distinct prompts of prompt set "
            f"{unmatched.name!r} but it holds {len(unmatched)}; lower eval.n_unmatched or "
            "eval.kl_prompts"
        )
    n, end = cfg.n_unmatched, cfg.n_unmatched + cfg.kl_prompts
    return EvalPrompts(
        harmful=selected_harmful,
        unmatched=PromptSet(unmatched.name, unmatched.prompts[:n], unmatched.categories[:n]),
        matched=matched.select(limit=cfg.n_matched),
        kl=PromptSet("kl", unmatched.prompts[n:end]),
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

    def rate(self, label: str) -> float | None:
        """The share of responses with ``label``; None for an empty set (nothing was measured)."""
        if not self.labels:
            return None
        return sum(lab == label for lab in self.labels) / len(self.labels)

    def rate_by_category(self, label: str = REFUSE) -> dict[str, float]:
        rates: dict[str, list[int]] = {}
        for category, lab in zip(self.categories, self.labels, strict=True):
            rates.setdefault(category or "", []).append(int(lab == label))
        return {category: sum(v) / len(v) for category, v in rates.items()}

    def outcome_counts(self) -> dict[str, int]:
        """How many responses got each of the four outcomes."""
        return {outcome: sum(label == outcome for label in self.labels) for outcome in OUTCOMES}

    def outcomes_by_category(self) -> dict[str, dict[str, int]]:
        """Per category: ``n`` and the count of each outcome."""
        table: dict[str, dict[str, int]] = {}
        for category, label in zip(self.categories, self.labels, strict=True):
            row = table.setdefault(category or "", {"n": 0, **dict.fromkeys(OUTCOMES, 0)})
            row["n"] += 1
            row[label] += 1
        return table


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
    loaded: LoadedModel,
    prompts: EvalPrompts,
    cfg: Any,
    capture_position: str | None = None,
    timing: dict[str, float] | None = None,
    judge: Judge | None = None,
) -> dict[str, SetResult]:
    """Greedy responses on the harmful, unmatched and matched held-out sets, labelled by
    ``judge`` (one batched call after generation).

    The three sets are generated together (one length-sorted run, ``loaded.batch_size`` prompts
    per batch): on a GPU a decoding step costs about the same for 30 rows as for 100, so one
    batch of all of them takes a third of the steps of three.

    A row stops early only when ``judge.is_decided`` says no later token can change its label
    (``eval.early_stop``), so early stopping never changes an outcome.

    Args:
        judge: labels each (prompt, response); None: the default ``rules`` judge.
        capture_position: ``last`` or ``mean_post_instruction`` to also keep the harmful and matched prompts'
            activations (``sets["harmful"].activations``), read off the generation's prefill.
        timing: if given, ``generation`` and ``judge`` seconds are added to it.
    """
    judge = judge or build_judge()
    prompt_sets = [getattr(prompts, name) for name in EVAL_SETS]
    all_prompts = [prompt for prompt_set in prompt_sets for prompt in prompt_set.prompts]
    start_time = time.perf_counter()
    generation = generate(
        loaded,
        all_prompts,
        cfg.max_new_tokens,
        loaded.batch_size,
        stop_when_decided=judge.is_decided if cfg.early_stop else False,
        capture_position=capture_position,
        progress="generation",
    )
    generated_time = time.perf_counter()
    labels = judge.label(all_prompts, generation.responses)
    if timing is not None:
        timing["generation"] = timing.get("generation", 0.0) + generated_time - start_time
        timing["judge"] = timing.get("judge", 0.0) + time.perf_counter() - generated_time
    results, start = {}, 0
    for name, prompt_set in zip(EVAL_SETS, prompt_sets, strict=True):
        rows = slice(start, start + len(prompt_set))
        start = rows.stop
        responses = generation.responses[rows]
        activations = None
        if name in ACTIVATION_SETS and generation.activations is not None:
            activations = generation.activations[rows]  # (n, n_layers, d_model)
        results[name] = SetResult(
            list(prompt_set.prompts),
            list(prompt_set.categories),
            responses,
            labels[rows],
            activations,
        )
    return results


def _row_batches(n_rows: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n_rows)) for i in range(0, n_rows, batch_size)]


def _continuation_inputs(
    loaded: LoadedModel, prompts: PromptSet, kl_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + the original's greedy continuation (up to ``kl_tokens`` tokens), left-padded.

    The continuation ends where the original model ends it (any of its end ids); a row that ends
    early is padded after its end token. All rows share one padded width (the reference is one
    tensor); they are run ``loaded.batch_size`` at a time, here and in every KL measurement, so
    the reference and the ablated model see the same batches.

    Returns:
        ``input_ids`` and ``attention_mask`` (n, prompt width + kl_tokens - 1): the prompt and the
        continuation's first ``kl_tokens - 1`` tokens (the last one is predicted, never fed); and
        ``continuation`` (n, kl_tokens), padded after each row's end.
    """
    tokenizer = loaded.tokenizer
    end_ids = end_token_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(end_ids[0])
    texts = format_chat(
        tokenizer, list(prompts.prompts), loaded.system_prompt, loaded.disable_thinking
    )
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
        loaded.device
    )
    prompt_width = encoded["input_ids"].shape[1]
    continuation = torch.full((len(texts), kl_tokens), pad_id, dtype=torch.long)
    with torch.inference_mode():
        for rows in _row_batches(len(texts), loaded.batch_size):
            output = loaded.model.generate(
                input_ids=encoded["input_ids"][rows],
                attention_mask=encoded["attention_mask"][rows],
                max_new_tokens=kl_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=end_ids.tolist(),  # stop at any end id the mask below knows
                pad_token_id=pad_id,
            )
            new = output[:, prompt_width:].cpu()  # shorter than kl_tokens if every row ended
            continuation[rows, : new.shape[1]] = new
    fed = continuation[:, :-1]
    input_ids = torch.cat([encoded["input_ids"].cpu(), fed], dim=1)
    # the padding after a row's end stays attended (its positions are masked out of the mean;
    # attention is causal, so they cannot change the real positions before them)
    attention_mask = torch.cat([encoded["attention_mask"].cpu(), torch.ones_like(fed)], dim=1)
    return input_ids, attention_mask, continuation


def continuation_positions_mask(continuation: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """Which continuation positions are real text: (n, kl_tokens) bool.

    Position j predicts continuation token j. It is real up to and including the position that
    predicts the row's first end token (the model chose to end there); every position after it
    is padding.
    """
    is_end = torch.isin(continuation, end_ids)  # (n, kl_tokens)
    ended_before = (torch.cumsum(is_end.int(), dim=1) - is_end.int()) > 0
    return ~ended_before


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
    """The original model's greedy continuation of ``prompts`` and its log-probs along it.

    Position j of ``log_probs`` is the distribution that predicts continuation token j (the last
    prompt token's logits for j = 0); ``positions_mask`` marks the positions up to and including
    the one that predicts the row's end token.
    """
    input_ids, attention_mask, continuation = _continuation_inputs(loaded, prompts, kl_tokens)
    # one batch at a time, coarse-grained before the next, so the full-vocabulary log-probs of
    # only one batch are ever held (100 prompts x 50 tokens x 248k vocabulary would be 5 GB)
    log_probs_parts, top_parts = [], []
    for rows in tqdm(
        _row_batches(len(input_ids), loaded.batch_size), desc="KL reference", leave=False
    ):
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
    positions_mask = continuation_positions_mask(continuation, end_token_ids(loaded))
    return KLReference(input_ids, attention_mask, positions_mask, log_probs, top_indices)


def compute_kl(loaded: LoadedModel, reference: KLReference) -> float:
    """Mean KL(original || current model) per real continuation position (nats).

    One teacher-forced forward pass per batch over the stored prompt + continuation: no
    generation, and only the ``kl_tokens`` positions' logits are computed. Positions after a
    row's end (``positions_mask`` false) count for nothing, whatever their values.
    """
    kl_tokens = reference.positions_mask.shape[1]
    mask = reference.positions_mask
    total = torch.zeros((), dtype=torch.float64)
    for rows in tqdm(
        _row_batches(len(reference.input_ids), loaded.batch_size), desc="KL", leave=False
    ):
        current = _continuation_log_probs(
            loaded, reference.input_ids[rows], reference.attention_mask[rows], kl_tokens
        )
        if reference.top_indices is not None:
            current = _coarse_grain(current, reference.top_indices[rows])
        original = reference.log_probs[rows]
        per_position = (original.exp() * (original - current)).sum(-1)  # (batch, kl_tokens)
        total += torch.where(mask[rows], per_position, 0.0).double().sum()
    return float(total / mask.sum().clamp_min(1))


@dataclass
class UneditedEvaluation:
    """The unedited model's evaluation, computed once and shared by every trial.

    In code "baseline" is the contrast (matched / unmatched); on disk and in records this
    evaluation keeps its older name, ``baseline_eval`` (the results contract).
    """

    sets: dict[str, SetResult]
    kl_reference: KLReference
    cache_hit: bool = False

    @property
    def harmful_activations(self) -> torch.Tensor | None:
        """(n_harmful, n_layers, d_model): the unedited model's activations on the harmful set."""
        return self.sets["harmful"].activations

    @property
    def matched_activations(self) -> torch.Tensor | None:
        """(n_matched, n_layers, d_model): the unedited model's activations on the matched set."""
        return self.sets["matched"].activations

    def rates(self) -> dict[str, Any]:
        """The ``baseline_eval`` block of results.json (:func:`summarize_unedited`)."""
        return summarize_unedited(self.sets)


def summarize_unedited(sets: dict[str, SetResult]) -> dict[str, Any]:
    """The unedited model's outcomes and refusal rates with their counts and Wilson intervals,
    recorded as results.json's ``baseline_eval`` block; a set that is empty (n=0) has its rate and
    counts None."""
    harmful, unmatched, matched = (sets[name] for name in EVAL_SETS)
    return {
        "n_harmful": len(harmful.labels),
        "outcomes": harmful.outcome_counts() if harmful.labels else None,
        **_rate("refusal_rate", harmful, REFUSE),
        "n_harmless": len(unmatched.labels),
        **_rate("harmless_refusal_rate", unmatched, REFUSE),
        "n_matched": len(matched.labels),
        **_rate("matched_harmless_refusal_rate", matched, REFUSE),
    }


def _rate(name: str, result: SetResult, outcome: str) -> dict[str, Any]:
    """``{name: rate, name_ci95: [low, high]}``; None for an empty set."""
    n = len(result.labels)
    return rate_record(name, sum(label == outcome for label in result.labels), n)


def unedited_eval_key(
    loaded: LoadedModel,
    prompts: EvalPrompts,
    cfg: Any,
    capture_position: str | None = None,
    judge: Judge | None = None,
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
        # the labels, and with early stopping the responses' lengths, are the judge's
        "judge": judge_fingerprint(judge or build_judge()),
        "early_stop": cfg.early_stop,
    }
    # with the results version (2: the KL reference ends where the model ends it), torch and
    # transformers: an entry made by other code or other numerics is never reused
    return content_key(settings)


def judge_fingerprint(judge: Judge) -> str:
    """What identifies a judge's labels: its class, name, version and settings."""
    settings = {
        key: value
        for key, value in vars(judge).items()
        if isinstance(value, (str, int, float, bool, type(None), list, tuple, dict))
        and key != "stats"
    }
    return digest(
        {
            "class": f"{type(judge).__module__}.{type(judge).__qualname__}",
            "name": judge.name,
            "version": getattr(judge, "version", None),
            "settings": settings,
        }
    )


def _load_unedited(directory: Path) -> UneditedEvaluation:
    """A cached entry (checksums verified by the caching layer); raises on another format."""
    payload = json.loads((directory / "sets.json").read_text())
    tensors = load_file(str(directory / "kl_reference.safetensors"))
    sets = {name: SetResult(**values) for name, values in payload["sets"].items()}
    for name in ACTIVATION_SETS:
        sets[name].activations = tensors.get(f"{name}_activations")
    reference = KLReference(
        tensors["input_ids"],
        tensors["attention_mask"],
        tensors["positions_mask"].bool(),
        tensors["log_probs"],
        tensors.get("top_indices"),
    )
    return UneditedEvaluation(sets, reference, cache_hit=True)


def _store_unedited(directory: Path, unedited: UneditedEvaluation) -> None:
    """Write an entry's files into ``directory`` (the caching layer's staging directory)."""
    tensors = {k: v.contiguous() for k, v in unedited.kl_reference.tensors().items()}
    tensors["positions_mask"] = tensors["positions_mask"].to(torch.uint8)
    for name in ACTIVATION_SETS:
        activations = unedited.sets[name].activations
        if activations is not None:
            tensors[f"{name}_activations"] = activations.contiguous()
    # serialised here and written by Python: a full disk is an OSError like every other write
    (directory / "kl_reference.safetensors").write_bytes(save(tensors))
    (directory / "sets.json").write_text(
        json.dumps({"sets": {k: v.texts() for k, v in unedited.sets.items()}})
    )


def evaluate_unedited(
    loaded: LoadedModel,
    prompts: EvalPrompts,
    cfg: Any,
    cache_dir: str | Path | None,
    capture_position: str | None = None,
    judge: Judge | None = None,
) -> UneditedEvaluation:
    """The unedited model's evaluation, from the cache when present.

    Entries live in ``<cache>/baseline_eval/<key>/`` (``sets.json``, ``kl_reference.safetensors``)
    and go through the caching layer: built by one process under a lock, checksummed, rebuilt
    when damaged. An entry written before entries had checksums is kept when it loads (its
    manifest is recorded then): the unedited model's evaluation costs minutes to recompute.

    Args:
        capture_position: also keep the harmful prompts' activations at this position (see
            :func:`evaluate_responses`); part of the cache key.
    """

    def compute() -> UneditedEvaluation:
        sets = evaluate_responses(loaded, prompts, cfg, capture_position, judge=judge)
        reference = compute_kl_reference(loaded, prompts.kl, cfg.kl_tokens, cfg.kl_top_k)
        return UneditedEvaluation(sets, reference)

    if cache_dir is None:
        return compute()
    # the cache directory keeps the record name, baseline_eval/, so existing entries are reused
    disk = DiskCache(cache_dir, "baseline_eval", adopt=True)
    judge = judge or build_judge()
    key = unedited_eval_key(loaded, prompts, cfg, capture_position, judge)

    def create(directory: Path) -> UneditedEvaluation:
        unedited = compute()
        _store_unedited(directory, unedited)
        return unedited

    unedited, _ = disk.get_or_create(key, _load_unedited, create)
    return unedited


def summarize_evaluation(
    sets: dict[str, SetResult],
    kl: float,
    unedited: UneditedEvaluation,
    cfg: Any,
) -> dict[str, Any]:
    """The ``eval`` block of results.json (:func:`summarize_outcomes`)."""
    return summarize_outcomes(
        sets,
        unedited.sets,
        kl,
        len(unedited.kl_reference.input_ids),
        {"kl_tokens": cfg.kl_tokens, "kl_top_k": cfg.kl_top_k, "kl_floor": cfg.kl_floor},
    )


def summarize_outcomes(
    sets: dict[str, SetResult],
    unedited_sets: dict[str, SetResult],
    kl: float,
    n_kl_prompts: int,
    kl_settings: dict[str, Any],
) -> dict[str, Any]:
    """The ``eval`` block of results.json (docs/results-contract.md).

    Every effective count is recorded (``n_harmful``, ``n_harmless`` for the unmatched
    false-refusal set, ``n_matched``, ``n_kl_prompts``); each rate comes with its Wilson 95%
    interval, and the rate, interval and counts of an empty set are None, never 0.
    ``refusals_removed`` counts the harmful prompts the unedited model refused and the edited
    one answers COMPLY: coherent compliance gained, the study's outcome.
    """
    harmful, unmatched, matched = (sets[name] for name in EVAL_SETS)
    unedited_labels = unedited_sets["harmful"].labels
    if unedited_sets["harmful"].prompts != harmful.prompts:
        raise ValueError("the unedited and the edited evaluation have different harmful prompts")
    outcomes = harmful.outcome_counts()
    refusals_removed = sum(
        before == REFUSE and after == COMPLY
        for before, after in zip(unedited_labels, harmful.labels, strict=True)
    )
    block: dict[str, Any] = {
        "n_harmful": len(harmful.labels),
        "n_harmless": len(unmatched.labels),
        "n_matched": len(matched.labels),
        "n_kl_prompts": n_kl_prompts,
        "outcomes": outcomes,
        "refusals": outcomes[REFUSE],
        # the unedited model's refusals; the record keeps its name (the results contract)
        "baseline_refusals": sum(label == REFUSE for label in unedited_labels),
    }
    for name, outcome in (
        ("refusal_rate", REFUSE),
        ("evasive_rate", EVASIVE),
        ("comply_rate", COMPLY),
        ("incoherent_rate", INCOHERENT),
    ):
        block.update(_rate(name, harmful, outcome))
    block["refusal_rate_by_category"] = harmful.rate_by_category(REFUSE)
    block["outcomes_by_category"] = harmful.outcomes_by_category()
    for prefix, rate_name, result in (
        ("harmless", "harmless_refusal_rate", unmatched),
        ("matched", "matched_harmless_refusal_rate", matched),
    ):
        counts = result.outcome_counts() if result.labels else None
        refusals_key = "harmless_refusals" if prefix == "harmless" else "matched_harmless_refusals"
        block[f"{prefix}_outcomes"] = counts
        block[refusals_key] = counts[REFUSE] if counts else None
        block.update(_rate(rate_name, result, REFUSE))
    block.update(_rate("harmless_evasive_rate", unmatched, EVASIVE))
    block.update(
        {
            "refusals_removed": refusals_removed,
            "kl_divergence": kl,
            "kl_tokens": kl_settings["kl_tokens"],
            "kl_top_k": kl_settings["kl_top_k"],
            # coherent compliance gained (a count, as Petrov's R) per nat of KL, KL floored so
            # that a near-zero KL does not divide by ~0
            "efficiency": refusals_removed / max(kl, kl_settings["kl_floor"]),
        }
    )
    return block
