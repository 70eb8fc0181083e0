"""Early stopping never changes a label, on the embedded model's real answers (slow).

A row stops generating once the judge says no later token can change its outcome; with the
default rules judge the same prompts must get the same labels with and without early stopping,
for the unedited model (which mostly refuses, so most rows stop early) and for an edited one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from abliterate.config import register_configs
from abliterate.pipeline import Session, run_trial

pytestmark = pytest.mark.slow

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _labels(directory: Path) -> dict[tuple[str, str], tuple[str, str]]:
    rows = [json.loads(line) for line in (directory / "completions.jsonl").open()]
    return {(r["set"], r["prompt"]): (r["baseline_label"], r["label"]) for r in rows}


def test_early_stop_gives_the_labels_of_full_generation(tmp_path):
    register_configs()
    session = Session()
    labels, stopped = {}, {}
    for early_stop in (True, False):
        out = tmp_path / f"early_stop_{early_stop}"
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "logger=none",
                    "layer=20",
                    "ablation.weight=0.5",  # a partial edit: a mix of refusals and answers
                    f"eval.early_stop={early_stop}",
                    f"paths.output_dir={out}",
                ],
            )
        results = run_trial(cfg, session=session)
        labels[early_stop] = _labels(out)
        stopped[early_stop] = results
    assert labels[True].keys() == labels[False].keys()
    differing = {k: (labels[True][k], labels[False][k]) for k in labels[True]
                 if labels[True][k] != labels[False][k]}  # fmt: skip
    assert not differing, differing
    # the comparison means something: both outcomes occur, and the unedited model refuses
    harmful = [v for (s, _), v in labels[False].items() if s == "harmful"]
    assert sum(before == "REFUSE" for before, _ in harmful) >= len(harmful) // 2
    assert stopped[True]["eval"]["outcomes"] == stopped[False]["eval"]["outcomes"]
