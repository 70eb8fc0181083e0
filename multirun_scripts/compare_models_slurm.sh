#!/usr/bin/env bash
# Question: does the matched baseline's advantage (or its absence) carry over from one model to
# another? Each model at its own measured layer (model.default_layer), both baselines, with and
# without SVD, two weights, the same evaluation (Petrov's) for all: 2 x 2 x 2 x 2 = 16 trials.
#
# One SLURM job per trial (1 GPU, 4 CPUs, 32 GB each). More models: add conf/model/<name>.yaml
# (repo id, dtype, default_layer) and list it in `model=`. Shared caches and resuming work as in
# petrov_grid_qwen3_5_2b_slurm.sh (paths.cache_dir and HF_HOME on a shared file system).
# Cluster settings go after it, e.g.: bash multirun_scripts/compare_models_slurm.sh hydra.launcher.partition=gpu
# Table: python -m abliterate.report multirun/compare_models
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m \
  hydra/launcher=slurm \
  hydra.sweep.dir=multirun/compare_models \
  hydra.launcher.gpus_per_node=1 \
  hydra.launcher.cpus_per_task=4 \
  hydra.launcher.mem_gb=32 \
  hydra.launcher.timeout_min=60 \
  model=qwen3_5_2b,smollm2_refuser \
  eval=petrov \
  baseline=matched,unmatched \
  extraction.orthogonalize=none,svd \
  ablation.weight=0.5,1.0 \
  "$@"
