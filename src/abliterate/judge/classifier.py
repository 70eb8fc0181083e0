"""``judge=classifier``: a Hugging Face sequence-classification refusal model as the judge.

Any ``AutoModelForSequenceClassification`` checkpoint by hub id or local folder. ``label_map``
maps the model's class names (``config.id2label``, case-insensitive) onto outcomes. Empty output
is REFUSE (the convention); where no class maps to INCOHERENT, the rules judge's coherence check
labels broken output INCOHERENT before the model is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from abliterate.judge.base import INCOHERENT, REFUSE, Judge, check_pairs
from abliterate.judge.rules import incoherence


class ClassifierJudge(Judge):
    name = "classifier"

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from abliterate.models import resolve_device, resolve_dtype

        if not cfg.model:
            raise ValueError("judge=classifier needs judge.model=<hub id or local folder>")
        self.device = resolve_device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            cfg.model,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            dtype=resolve_dtype(cfg.dtype, self.device),
        ).to(self.device)
        self.model.eval()
        mapping = {str(k).lower(): v for k, v in dict(cfg.label_map).items()}
        id2label = self.model.config.id2label
        self.class_outcomes: dict[int, str] = {}
        for index, class_name in id2label.items():
            outcome = mapping.get(str(class_name).lower())
            if outcome is None:
                raise ValueError(
                    f"judge.label_map has no outcome for the model's class {class_name!r}; its "
                    f"classes are {sorted(map(str, id2label.values()))}"
                )
            self.class_outcomes[int(index)] = outcome
        self.checks_coherence = INCOHERENT not in self.class_outcomes.values()
        self.pair = cfg.input == "pair"
        self.batch_size = cfg.batch_size
        self.max_length = cfg.max_length

    @torch.inference_mode()
    def label(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        check_pairs(prompts, responses)
        labels: list[str | None] = [None] * len(responses)
        ask = []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if not response.strip():
                labels[i] = REFUSE
            elif self.checks_coherence and incoherence(prompt, response.strip()):
                labels[i] = INCOHERENT
            else:
                ask.append(i)
        for start in range(0, len(ask), self.batch_size):
            rows = ask[start : start + self.batch_size]
            texts = [responses[i].strip() for i in rows]
            pairs = [prompts[i] for i in rows] if self.pair else None
            encoded = self.tokenizer(
                *((pairs, texts) if pairs is not None else (texts,)),
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            classes = self.model(**encoded).logits.argmax(dim=-1).tolist()
            for i, c in zip(rows, classes, strict=True):
                labels[i] = self.class_outcomes[int(c)]
        self.stats["asked_model"] = self.stats.get("asked_model", 0) + len(ask)
        return [label for label in labels if label is not None]
