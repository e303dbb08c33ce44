"""`ov-train`: training from the shipped configs, as `python train.py` runs it in a checkout; `ov-train plan ...`,
the memory and time planner.

    ov-train stage=onevision                          # the embedded default, from any directory
    ov-train --config-dir ~/my_conf experiment=mine   # your own config directory, searched before the shipped one
    ov-train plan model=ov_qwen2_7b trainer.devices=8 # memory and time of a step, nothing trained
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
from ov_train.resources import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _train(cfg: DictConfig) -> None:
    from ov_train.run import train  # after Hydra has parsed the command line: --help and --cfg stay quick

    train(cfg)


def main() -> None:
    if sys.argv[1:2] == ["plan"]:
        from ov_train.planner.cli import main as plan_main

        sys.exit(plan_main(sys.argv[2:]))
    _train()


if __name__ == "__main__":
    main()
