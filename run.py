"""One extraction-plus-abliteration trial; `python run.py -m ...` sweeps.

python run.py                                   # the default trial on the embedded model
python run.py baseline=matched layer=20 ablation.weight=0.5
python run.py -m baseline=matched,unmatched layer=range(18,24) ablation.weight=0.5,1.0
"""

import errno

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from abliterate.cache import LockTimeout
from abliterate.config import ConfigError, register_configs, report_choice_errors_in_one_line
from abliterate.pipeline import main
from abliterate.prompts import PromptDataError

register_configs()
report_choice_errors_in_one_line()  # a bad choice value: one line, as a ConfigError
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    try:
        return main(cfg)
    except (ConfigError, PromptDataError, LockTimeout) as error:
        # Hydra prints a compact exception as its message alone (no traceback) and exits 1; in a
        # multirun the other trials still run and the sweep then fails naming this one
        raise CompactHydraException(f"error: {error}") from None
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        raise CompactHydraException(f"error: {error}") from None


if __name__ == "__main__":
    app()
