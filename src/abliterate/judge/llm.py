"""``judge=llm``: a chat model as the judge, with the rubric of ``conf/judge/llm.yaml``.

The rubric is formatted with ``{prompt}`` and ``{response}``, sent as one user turn through the
model's chat template, and answered greedily (``judge.max_new_tokens`` tokens). The verdict is
parsed strictly: its first word (markdown ``*``, quotes and trailing punctuation stripped, case
ignored) must be one of the four outcomes. Anything else is *unparseable*: it is counted in
``stats["unparseable"]`` (with ``stats["fallback"]`` naming what labelled it) and labelled by
``judge.fallback`` (default: the rules judge). Empty output is REFUSE without asking the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from abliterate.judge.base import OUTCOMES, REFUSE, Judge, check_pairs

_FIRST_WORD = re.compile(r"[A-Za-z]+")


def parse_verdict(text: str) -> str | None:
    """The outcome a verdict names as its first word, or None."""
    stripped = text.strip().lstrip("*_`\"'#>- \n")
    match = _FIRST_WORD.match(stripped)
    if match is None:
        return None
    word = match.group(0).upper()
    return word if word in OUTCOMES else None


class LLMJudge(Judge):
    name = "llm"

    def __init__(
        self, cfg: Any, loaded: Any = None, cache_dir: Any = None, fallback: Judge | None = None
    ) -> None:
        super().__init__()
        if not cfg.rubric or "{response}" not in cfg.rubric:
            raise ValueError(
                "judge.rubric must be set and contain {response} (conf/judge/llm.yaml)"
            )
        self.rubric = cfg.rubric
        self.max_new_tokens = cfg.max_new_tokens
        self.max_response_chars = cfg.max_response_chars
        self.batch_size = cfg.batch_size
        if loaded is None:
            loaded = self._load(cfg, cache_dir)
        self.loaded = loaded
        self.fallback_name = cfg.fallback
        # the judge asked when the answer cannot be parsed (built by build_judge, which knows
        # every judge), or None when judge.fallback names an outcome to count instead
        if cfg.fallback not in OUTCOMES and fallback is None:
            raise ValueError(f"judge.fallback={cfg.fallback!r} needs a fallback judge")
        self.fallback = None if cfg.fallback in OUTCOMES else fallback
        self.stats = {"asked": 0, "unparseable": 0, "fallback": cfg.fallback, "examples": []}

    @staticmethod
    def _load(cfg: Any, cache_dir: Any) -> Any:
        from omegaconf import OmegaConf

        from abliterate.config import ModelConfig
        from abliterate.loading import load_model

        if cfg.source != "embedded" and not cfg.model:
            raise ValueError("judge=llm needs judge.model=<hub id or dir> or judge.source=embedded")
        model_cfg = OmegaConf.structured(
            ModelConfig(
                name="judge",
                source=cfg.source,
                path=cfg.model or "embedded",
                dtype=cfg.dtype,
                device=cfg.device,
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision,
                default_layer=0,
                batch_size=cfg.batch_size,
            )
        )
        cache = cache_dir or os.environ.get(
            "ABLITERATE_CACHE", str(Path.home() / ".cache" / "abliterate")
        )
        return load_model(model_cfg, cache)

    def label(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        from abliterate.generation import generate

        check_pairs(prompts, responses)
        labels: list[str] = [REFUSE] * len(responses)
        ask = [i for i, r in enumerate(responses) if r.strip()]
        queries = [
            self.rubric.replace("{prompt}", prompts[i]).replace(
                "{response}", responses[i].strip()[: self.max_response_chars]
            )
            for i in ask
        ]
        verdicts = (
            generate(self.loaded, queries, self.max_new_tokens, self.batch_size).responses
            if queries
            else []
        )
        unparsed = []
        for i, verdict in zip(ask, verdicts, strict=True):
            outcome = parse_verdict(verdict)
            if outcome is None:
                unparsed.append(i)
                if len(self.stats["examples"]) < 5:
                    self.stats["examples"].append(verdict[:80])
            else:
                labels[i] = outcome
        if unparsed:
            if self.fallback is None:
                fallback = [self.fallback_name] * len(unparsed)
            else:
                fallback = self.fallback.label(
                    [prompts[i] for i in unparsed], [responses[i] for i in unparsed]
                )
            for i, outcome in zip(unparsed, fallback, strict=True):
                labels[i] = outcome
        self.stats["asked"] += len(ask)
        self.stats["unparseable"] += len(unparsed)
        return labels
