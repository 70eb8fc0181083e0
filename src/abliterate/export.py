"""Saving an abliterated model: safetensors weights, tokenizer, and a card naming the trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abliterate.models import LoadedModel


def export_model(loaded: LoadedModel, directory: Path, results: dict[str, Any]) -> Path:
    """Save the model as it is now (call inside the ablation) so ``from_pretrained`` loads it."""
    directory.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    card = {
        "source_model": results["trial"]["model"],
        "trial": results["trial"],
        "directions": {k: results["directions"][k] for k in ("count", "labels", "degenerate")},
        "eval": {k: v for k, v in results["eval"].items() if k != "refusal_rate_by_category"},
        "baseline_eval": results["baseline_eval"],
        "note": "Refusal directions were projected out of this model's residual-stream writers by abliterate.",
    }
    (directory / "abliteration_card.json").write_text(json.dumps(card, indent=2, default=str))
    return directory
