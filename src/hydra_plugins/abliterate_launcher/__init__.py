"""Hydra launchers that pack several trials into one submitit job (``hydra/launcher=slurm`` and
``hydra/launcher=local`` of this project): see :mod:`.packed_launcher`."""
