#!/usr/bin/env bash
# Question: on Qwen3.5-2B, does a topic-matched harmless baseline give better refusal directions
# than an unmatched one, at every layer and ablation weight, with and without SVD, and with the
# directions merged or projected as a subspace? (the reference study's full grid, Petrov 2026,
# plus the combination confound: 2 baselines x 24 layers x 5 weights x 2 SVD x 2 combine
# (merged, subspace) = 960 trials; Table 1 of the report lists each combine as its own setting.)
#
# How long: not measured yet. Each job is a process start, a model load, its SOM directions and
# one trial; the per-trial GPU time is the README's "Scaling" table (to be filled in by
# `python benchmarks/bench.py --device cuda`): the grid takes about ceil(960 / N) x that per-job
# time on N GPUs (at most 32 at once by default: 30 waves); the combine axis doubles it.
#
# One SLURM job per trial (1 GPU, 4 CPUs, 32 GB each; at most 32 at once). Jobs share
# paths.cache_dir (default ~/.cache/abliterate, ABLITERATE_CACHE overrides): put it, and HF_HOME,
# on a file system every node sees and that supports file locks; download the model once first
# (`huggingface-cli download Qwen/Qwen3.5-2B`). The first job extracts the activations and
# evaluates the unedited model, under file locks; every other job waits for them and reads them.
# Rerunning this script resumes the grid: complete trials are skipped (force=true reruns them).
# Cluster settings go after it, e.g.:
#   bash multirun_scripts/petrov_grid_qwen3_5_2b_slurm.sh hydra.launcher.partition=gpu hydra.launcher.account=<acct>
# Table: python -m abliterate.report multirun/petrov_grid_qwen3_5_2b
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m \
  experiment=petrov_qwen3_5_2b \
  hydra/launcher=slurm \
  hydra.sweep.dir=multirun/petrov_grid_qwen3_5_2b \
  hydra.launcher.gpus_per_node=1 \
  hydra.launcher.cpus_per_task=4 \
  hydra.launcher.mem_gb=32 \
  hydra.launcher.timeout_min=60 \
  baseline=matched,unmatched \
  'layer=range(0,24)' \
  ablation.weight=0.3,0.5,0.8,1.0,1.2 \
  extraction.orthogonalize=none,svd \
  ablation.combine=merged,subspace \
  "$@"
