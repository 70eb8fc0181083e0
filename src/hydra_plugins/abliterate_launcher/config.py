"""Config schemas of the packed launchers, registered in Hydra's ConfigStore.

They extend hydra-submitit-launcher's schemas by two keys; ``conf/hydra/launcher/slurm.yaml`` and
``local.yaml`` take them as their defaults (``abliterate_slurm``, ``abliterate_local``).
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

PACKAGE = "hydra_plugins.abliterate_launcher.packed_launcher"


@dataclass
class PackedSlurmConf(SlurmQueueConf):
    _target_: str = f"{PACKAGE}.PackedSlurmLauncher"
    # trials run one after another in one job, one Python process and one model load; 1 submits
    # one job per trial (hydra-submitit-launcher unchanged)
    trials_per_job: int = 1
    # override keys whose values a pack shares (e.g. [baseline, layer]: those trials share their
    # directions); a group is split over jobs only when it holds more than trials_per_job trials
    group_by: list[str] = field(default_factory=list)


@dataclass
class PackedLocalConf(LocalQueueConf):
    _target_: str = f"{PACKAGE}.PackedLocalLauncher"
    trials_per_job: int = 1
    group_by: list[str] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/launcher",
    name="abliterate_slurm",
    node=PackedSlurmConf(),
    provider="abliterate_launcher",
)
ConfigStore.instance().store(
    group="hydra/launcher",
    name="abliterate_local",
    node=PackedLocalConf(),
    provider="abliterate_launcher",
)
