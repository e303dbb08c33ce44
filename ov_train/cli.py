"""`ov-train`: training from the shipped configs, as `python train.py` runs it in a checkout.

    ov-train stage=onevision                          # the embedded default, from any directory
    ov-train --config-dir ~/my_conf experiment=mine   # your own config directory, searched before the shipped one
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
from ov_train.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _train(cfg: DictConfig) -> None:
    from ov_train.run import (
        train,  # after Hydra has parsed the command line: --help and --cfg stay quick
    )

    train(cfg)


def main() -> None:
    _train()


if __name__ == "__main__":
    main()
