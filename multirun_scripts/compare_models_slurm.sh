#!/usr/bin/env bash
# Question: does the matched baseline's advantage (or its absence) carry over from one model to
# another, for both ways of combining the directions? Each model at its own measured layer
# (model.default_layer), both baselines, with and without SVD, combine merged and subspace, two
# weights, the same evaluation (Petrov's) for all: 2 x 2 x 2 x 2 x 2 = 32 trials; Table 1 of the
# report lists each combine as its own setting.
#
# How long: not measured. 32 jobs, one wave when 32 GPUs are free (array_parallelism is 32): as
# long as the slowest job plus the queue wait. For scale: an embedded-model job with the smaller
# Heretic-equal evaluation is about 37 s on 2 CPU cores (README, derived from measured stages),
# and eval=petrov generates about 6x as many tokens; Qwen3.5-2B's GPU time per trial is the
# README's "Scaling" table (still to be measured).
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
  ablation.combine=merged,subspace \
  ablation.weight=0.5,1.0 \
  "$@"
