#!/usr/bin/env bash
# Question: which (layer, weight, combine) choices remove the most refusals for the least damage?
# An automated search, as Heretic does with Optuna: multi-objective TPE minimizing the harmful
# refusal rate and KL(original || ablated) together over layer 8..29, weight 0.2..1.5 and
# ablation.combine merged or subspace (a categorical parameter) on the embedded model (matched
# baseline), 60 trials. The log ends with the Pareto front;
# <sweep dir>/optimization_results.yaml keeps it, and the report separates the two combines.
#
# How long: about 20 min on one 2-core machine (75 s of setup, then about 15.5 s per trial plus
# a SOM at each new layer, about 2 s: the README's cost model, not timed as a whole).
#
# Needs the task to return both objectives: `objectives=[...]` below names them (results.json
# keys), and run.py returns their values in that order.
# One process (the model loads once); append hydra/launcher=slurm to run each batch of
# hydra.sweeper.n_jobs trials as SLURM jobs instead.
# Resuming: the study lives in memory (optuna 2.10's SQL storage does not work with SQLAlchemy
# 2), but the sampler is seeded and a trial's directory is named by its parameters, so a rerun
# replays the same suggestions, reads their results back without model work, and continues
# (raise hydra.sweeper.n_trials to extend a finished search the same way).
set -euo pipefail
cd "$(dirname "$0")/.."

python run.py -m \
  experiment=smollm2_demo \
  hydra/launcher=basic \
  hydra/sweeper=optuna \
  hydra/sweeper/sampler=tpe \
  hydra.sweeper.sampler.seed=0 \
  hydra.sweeper.sampler.multivariate=true \
  'hydra.sweeper.direction=[minimize,minimize]' \
  hydra.sweeper.study_name=embedded_layer_weight \
  hydra.sweeper.n_trials=60 \
  hydra.sweeper.n_jobs=1 \
  hydra.sweep.dir=multirun/optuna_layer_weight_embedded \
  baseline=matched \
  'objectives=[eval.refusal_rate,eval.kl_divergence]' \
  'layer=int(interval(8,29))' \
  'ablation.weight=interval(0.2,1.5)' \
  'ablation.combine=choice(merged,subspace)' \
  "$@"
