"""`ov-train`: training from the shipped configs, as `python train.py` runs it in a checkout; `ov-train plan ...`,
the memory and time planner.

    ov-train stage=onevision                          # the embedded default, from any directory
    ov-train --config-dir ~/my_conf experiment=mine   # your own config directory, added to the shipped one
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
    # Imported after Hydra has parsed the command line: --help and --cfg stay quick.
    from ov_train.config.recipe import RecipeError
    from ov_train.config.run_plan import ConfigError
    from ov_train.planner.estimate import PlanError
    from ov_train.run import train
    from ov_train.training.callbacks import CheckpointWriteError
    from ov_train.training.loader_workers import stop_loader_workers
    from ov_train.utils.logging import get_logger
    from ov_train.utils.run_lock import RunDirBusy
    from ov_train.utils.safe_load import CheckpointError

    try:
        train(cfg)
    except (ConfigError, RecipeError, PlanError, CheckpointError, RunDirBusy, CheckpointWriteError) as err:
        # These name the culprit and what is allowed; a traceback of our own frames above them would bury that.
        get_logger("ov_train").error("%s", err)
        sys.exit(1)
    finally:
        # Whatever ended train(), no loader worker may keep this process from exiting (a no-op when none is left).
        stop_loader_workers()


def main() -> None:
    if sys.argv[1:2] == ["plan"]:
        from ov_train.planner.cli import main as plan_main

        sys.exit(plan_main(sys.argv[2:]))
    _train()


if __name__ == "__main__":
    main()
