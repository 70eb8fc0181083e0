#!/usr/bin/env bash
# Question: does the matched-vs-unmatched result of the reference study hold on the embedded
# refusing model (SmolLM2-135M fine-tuned here), over the same grid, and does it survive the
# combination confound? (2 baselines x 30 layers x 5 weights x with/without SVD x combine
# merged/subspace = 1200 trials; the embedded model has 30 layers.) `ablation.combine` is swept
# explicitly, so merged-after-SVD (which removes only 1/k of each orthonormal axis) and subspace
# without SVD are measured too; Table 1 of the report lists each combine as its own setting.
#
# How long: about 75 s of setup plus about 15.5 s per trial on one 2-core machine, i.e. about
# 5 h (the README's cost model from `make bench`'s stage times, not timed as a whole; the
# directions do not depend on combine, so its second value costs only the evaluations).
# `eval=quick` (appended) makes a faster first pass; fewer layers, e.g. 'layer=range(2,30,3)',
# cut it proportionally.
#
# One process, no cluster, CPU is enough: the in-process launcher loads the model once and
# extracts activations once, so each trial pays only for its ablated evaluation.
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
  ablation.combine=merged,subspace \
  "$@"
