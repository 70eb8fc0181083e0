"""Saving an abliterated model: safetensors weights, tokenizer, and a card naming the trial."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abliterate.models import LoadedModel


def export_model(loaded: LoadedModel, directory: Path, results: dict[str, Any]) -> Path:
    """Save the model as it is now (call inside the ablation) so ``from_pretrained`` loads it."""
    directory.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    config = model.config
    tied_in_config = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    output_embeddings = model.get_output_embeddings()
    untied = (
        output_embeddings is not None
        and output_embeddings.weight is not model.get_input_embeddings().weight
    )
    if tied_in_config and untied:
        # The edit gave the embedding its own (edited) weight while the head kept the original:
        # save both, or loading would tie the head to the edited embedding.
        config.get_text_config().tie_word_embeddings = False
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if tied_in_config and untied:
            config.get_text_config().tie_word_embeddings = True
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
