#!/usr/bin/env bash
# Question: does the matched-vs-unmatched result of the reference study hold on the embedded
# refusing model (SmolLM2-135M fine-tuned here), over the same grid? (2 baselines x 30 layers x
# 5 weights x with/without SVD = 600 trials; the embedded model has 30 layers)
#
# One process, no cluster, CPU is enough: the in-process launcher loads the model once and
# extracts activations once, so each trial pays only for its ablated evaluation. `eval=quick`
# (appended) makes a faster first pass.
# Rerunning this script resumes the grid: complete trials are skipped (force=true reruns them).
# Table: python -m abliterate.report multirun/petrov_grid_embedded
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m \
  experiment=smollm2_demo \
  hydra/launcher=basic \
  hydra.sweep.dir=multirun/petrov_grid_embedded \
  baseline=matched,unmatched \
  'layer=range(0,30)' \
  ablation.weight=0.3,0.5,0.8,1.0,1.2 \
  extraction.orthogonalize=none,svd \
  "$@"
