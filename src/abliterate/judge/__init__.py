"""Judges: label a (prompt, response) pair REFUSE, EVASIVE, COMPLY or INCOHERENT.

``build_judge(cfg)`` makes the judge a ``judge`` config names: ``rules`` (default), ``markers``,
``classifier`` (a Hugging Face sequence classifier), ``llm`` (a chat model with a rubric) or
``probe`` (a linear probe on SmolLM2-135M features and the rules label).
"""

from __future__ import annotations

from typing import Any

from abliterate.judge.base import COMPLY, EVASIVE, INCOHERENT, OUTCOMES, REFUSE, Judge
from abliterate.judge.config import JUDGES, JudgeConfig, validate_judge_config

__all__ = [
    "COMPLY", "EVASIVE", "INCOHERENT", "JUDGES", "OUTCOMES", "REFUSE", "Judge", "JudgeConfig",
    "build_judge", "validate_judge_config",
]  # fmt: skip


def build_judge(cfg: Any = None, loaded: Any = None, cache_dir: Any = None) -> Judge:
    """The judge ``cfg`` (a JudgeConfig, DictConfig or dict; None: rules) describes.

    Args:
        cfg: the ``judge`` config.
        loaded: an already loaded ``LoadedModel`` to use as the ``llm`` judge instead of loading
            ``cfg.model`` (ignored by the other judges).
        cache_dir: the project cache, for ``judge=llm judge.source=embedded`` (default:
            ``$ABLITERATE_CACHE`` or ``~/.cache/abliterate``).
    """
    if cfg is None:
        cfg = JudgeConfig()
    elif isinstance(cfg, dict):
        cfg = JudgeConfig(**cfg)
    validate_judge_config(cfg)
    if cfg.name == "rules":
        from abliterate.judge.relevance import DEFAULT_THRESHOLD, build_scorer
        from abliterate.judge.rules import RulesJudge

        scorer = build_scorer(getattr(cfg, "relevance_model", None))
        threshold = float(getattr(cfg, "relevance_threshold", DEFAULT_THRESHOLD))
        return RulesJudge(scorer=scorer, relevance_threshold=threshold)
    if cfg.name == "markers":
        from abliterate.judge.markers import MarkersJudge

        return MarkersJudge()
    if cfg.name == "classifier":
        from abliterate.judge.classifier import ClassifierJudge

        return ClassifierJudge(cfg)
    if cfg.name == "probe":
        from abliterate.judge.probe import ProbeJudge

        return ProbeJudge(batch_size=cfg.batch_size, device=cfg.device)
    from abliterate.judge.llm import LLMJudge

    fallback = None if cfg.fallback in OUTCOMES else build_judge({"name": cfg.fallback})
    return LLMJudge(cfg, loaded=loaded, cache_dir=cache_dir, fallback=fallback)
