"""Check that a refactor changes no number: run a fixed set of trials on a tiny random-init model
and compare every number they record with a snapshot taken before the change.

    python benchmarks/same_numbers.py --write /tmp/before.json   # on the old code
    python benchmarks/same_numbers.py --check /tmp/before.json   # on the new code: exit 1 on any difference

The trials cover both baselines, SOM and mean extraction, SVD orthogonalisation, every combine
mode, hooks and weights, relative direction norms and replicate seeds. They use ``judge=markers``
(its list is fixed by design) so that work on the rules judge does not show up as a difference.
Compared: every block of results.json except ``timing_s``, ``provenance`` and ``cache`` (which
differ run to run by design), the completions, and the stored direction tensors (bit for bit).
A value that changed or a key that disappeared is a difference; a key the new code adds is
listed but is not one.

    python benchmarks/same_numbers.py --sweeps OLD_SWEEP NEW_SWEEP

compares two finished sweeps the same way, trial by trial (trials matched by their directory
names): for example the demo sweep run by the old and by the new code, each with
``judge=markers`` and its own empty cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VOLATILE = ("timing_s", "provenance", "cache")
ADDED: set[str] = (
    set()
)  # keys the new code records that the snapshot lacks: listed, not differences
TRIALS: list[tuple[str, ...]] = [
    ("baseline=matched",),
    ("baseline=unmatched",),
    ("baseline=matched", "extraction.orthogonalize=svd", "ablation.combine=merged"),
    ("baseline=matched", "extraction.orthogonalize=svd", "ablation.combine=subspace"),
    ("baseline=unmatched", "extraction=diff_in_means"),
    ("baseline=matched", "extraction=som_global"),
    ("baseline=matched", "ablation.mode=hooks", "ablation.weight=0.5"),
    ("baseline=matched", "ablation.direction_norm=relative"),
    ("baseline=matched", "seed=1"),
    ("baseline=unmatched", "layer=2", "ablation.scope=layer", "ablation.combine=sequential"),
    ("baseline=matched", "ablation.norm_preserving=true", "ablation.combine=sum"),
]


def _compose(model_dir: Path, work: Path, overrides: tuple[str, ...], index: int):
    from hydra import compose, initialize_config_dir

    from abliterate.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "model=hub",
                f"model.path={model_dir}",
                "model.name=tiny-llama",
                "model.default_layer=1",
                "model.dtype=float32",
                "model.device=cpu",
                "eval=quick",
                "eval.max_new_tokens=8",
                "judge=markers",
                "extraction.iterations=200",
                "data.harmful_train.per_category=4",
                "data.matched_train.per_category=4",
                "data.unmatched_train.limit=24",
                f"paths.cache_dir={work / 'cache'}",
                f"paths.output_dir={work / f'trial{index}'}",
                "logger=none",
                *overrides,
            ],
        )


def _snapshot(work: Path) -> dict[str, Any]:
    import torch
    from conftest import build_char_tokenizer
    from tiny_models import build_tiny_model

    from abliterate.pipeline import Session, run_trial

    torch.set_num_threads(1)
    model_dir = work / "tiny-llama"
    model = build_tiny_model("llama", seed=0)
    tokenizer = build_char_tokenizer()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # the builtin prompts need more than tiny_models' 64 positions (rope: no position table, so
    # the weights and every number are those of the snapshot's model)
    model.config.max_position_embeddings = 512
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    session = Session()
    snapshot: dict[str, Any] = {}
    for index, overrides in enumerate(TRIALS):
        cfg = _compose(model_dir, work, overrides, index)
        results = run_trial(cfg, session=session)
        snapshot[" ".join(overrides)] = _trial_record(Path(cfg.paths.output_dir), results)
    return snapshot


def _trial_record(trial_dir: Path, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """One finished trial's numbers: ``results`` as ``run_trial`` returned them (NaN kept as NaN;
    snapshots have always been taken so), else read back from its results.json (where NaN is
    null: compare sweeps with sweeps, snapshots with snapshots), with its completions and
    direction tensors."""
    from safetensors.torch import load_file

    if results is None:
        results = json.loads((trial_dir / "results.json").read_text())
    record = {k: v for k, v in results.items() if k not in VOLATILE}
    record["config"] = {k: v for k, v in record["config"].items() if k != "paths"}
    record["completions"] = [
        json.loads(line) for line in (trial_dir / "completions.jsonl").read_text().splitlines()
    ]
    tensors = load_file(str(trial_dir / "directions.safetensors"))
    record["direction_tensors"] = {k: v.double().flatten().tolist() for k, v in tensors.items()}
    # NaN compares equal on both sides only after the JSON round trip
    return json.loads(json.dumps(record))


def _sweep_records(sweep_dir: Path) -> dict[str, Any]:
    trials = sorted(path.parent for path in sweep_dir.glob("*/results.json"))
    if not trials:
        raise SystemExit(f"error: no trial (*/results.json) under {sweep_dir}")
    return {trial.name: _trial_record(trial) for trial in trials}


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            if key not in after:
                out.append(f"{path}.{key}: removed")
            elif key not in before:
                ADDED.add(f"{path}.{key}".lstrip("."))
            else:
                out.extend(_differences(before[key], after[key], f"{path}.{key}"))
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [d for i, (b, a) in pairs for d in _differences(b, a, f"{path}[{i}]")]
    if before == after or (before != before and after != after):  # NaN on both sides is equal
        return []
    return [f"{path}: {before!r} -> {after!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the snapshot here")
    group.add_argument("--check", type=Path, help="compare with this snapshot")
    group.add_argument("--sweeps", type=Path, nargs=2, metavar=("OLD", "NEW"),
                       help="compare two finished sweeps' trials instead")  # fmt: skip
    args = parser.parse_args()
    if args.sweeps:
        return _report(_sweep_records(args.sweeps[0]), _sweep_records(args.sweeps[1]))
    with tempfile.TemporaryDirectory() as tmp:
        # the snapshot round-trips through JSON so both sides compare as JSON values (NaN included)
        # (and with the temporary directory's name taken out of paths)
        snapshot = json.loads(json.dumps(_snapshot(Path(tmp))).replace(tmp, "<work>"))
    if args.write:
        args.write.write_text(json.dumps(snapshot, indent=1))
        print(f"wrote {len(snapshot)} trials to {args.write}")
        return 0
    return _report(json.loads(args.check.read_text()), snapshot)


def _report(before: dict[str, Any], snapshot: dict[str, Any]) -> int:
    differences = [
        f"{name}: {line}"
        for name in sorted(set(before) | set(snapshot))
        for line in (
            _differences(before[name], snapshot[name])
            if name in before and name in snapshot
            else ["trial missing on one side"]
        )
    ]
    for line in differences[:40]:
        print(line)
    if ADDED:
        print(f"added (not a difference): {', '.join(sorted(ADDED))}")
    print(f"{len(snapshot)} trials, {len(differences)} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
