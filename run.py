"""One extraction-plus-abliteration trial; `python run.py -m ...` sweeps.

python run.py                                   # the default trial on the embedded model
python run.py baseline=matched layer=20 ablation.weight=0.5
python run.py -m baseline=matched,unmatched layer=range(18,24) ablation.weight=0.5,1.0
"""

import hydra
from omegaconf import DictConfig

from abliterate.config import register_configs
from abliterate.pipeline import main

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    return main(cfg)


if __name__ == "__main__":
    app()
