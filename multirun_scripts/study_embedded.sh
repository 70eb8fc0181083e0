#!/usr/bin/env bash
# Question: on the embedded refusing model, does a topic-matched contrast baseline remove refusal
# as well as the generic (unmatched) one, and does the answer depend on how the per-category
# directions are combined (merged vs subspace) and on SVD orthogonalisation? The committed study
# (docs/study-embedded/) was produced by this script on the commit named in its README.
#
# Grid (88 trials, SOM per category, scope=all, eval=default: 36 harmful prompts, rules judge):
#   depth scan:  baseline x layers 6,10,14,26 at w=1, merged                         (8 trials)
#   fine grid:   baseline x layers 18,22 x Petrov's weights 0.3,0.5,0.8,1.0,1.2
#                x combine merged,subspace x orthogonalize none,svd                    (80 trials)
# How long: about 45 min on one quiet 2-core machine (one process: the model and the activations
# load once; each trial pays its ablated evaluation, about 30 s at 64 new tokens).
#
# The embedded model was fine-tuned here to refuse harmful prompts and to answer matched-harmless
# ones: its results test the pipeline, not Petrov's hypothesis about naturally aligned models.
# The committed study ran on refuser recipe v9, the default then (no model.recipe override); the
# default is now v16. Add model.recipe=v9 to rerun it on v9's build, or another named recipe to
# run it on that build: each recipe's trials hash apart and get directories of their own (their
# names end in ,model.recipe=...); use a fresh SWEEP for each, so one report does not hold two
# builds.
#
# Usage: bash multirun_scripts/study_embedded.sh [extra overrides]   (rerunning resumes)
#        OUT=docs/study-embedded bash multirun_scripts/study_embedded.sh   (where the report goes)
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-multirun/study_embedded}
OUT=${OUT:-$SWEEP/report}
PY=${PY:-python}

$PY run.py -m experiment=smollm2_demo hydra/launcher=basic logger=none hydra.sweep.dir="$SWEEP" \
  baseline=matched,unmatched layer=6,10,14,26 ablation.weight=1.0 ablation.combine=merged "$@"
$PY run.py -m experiment=smollm2_demo hydra/launcher=basic logger=none hydra.sweep.dir="$SWEEP" \
  baseline=matched,unmatched layer=18,22 ablation.weight=0.3,0.5,0.8,1.0,1.2 \
  ablation.combine=merged,subspace extraction.orthogonalize=none,svd "$@"
# the report exits 1 when some trial is incomplete: the study is then not finished
$PY -m abliterate.report "$SWEEP" --out "$OUT"
