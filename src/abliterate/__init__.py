"""abliterate: refusal-abliteration experiments as tracked Hydra sweeps."""

__version__ = "0.1.0"
