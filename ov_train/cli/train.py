"""`ov-train [OVERRIDES]`: training from the shipped configs, as `python train.py` runs it in a checkout."""
from __future__ import annotations

import sys

from omegaconf import DictConfig

from ov_train.cli import run_hydra


def _train(cfg: DictConfig) -> None:
    # Imported after Hydra has parsed the command line: --help and --cfg stay quick.
    from ov_train.checkpoints.safe_load import CheckpointError
    from ov_train.checkpoints.saving import CheckpointWriteError
    from ov_train.config.recipe import RecipeError
    from ov_train.config.run_plan import ConfigError
    from ov_train.planner.estimate import PlanError
    from ov_train.run import train
    from ov_train.training.loader_workers import stop_loader_workers
    from ov_train.utils.logging import get_logger
    from ov_train.utils.run_lock import RunDirBusy

    try:
        train(cfg)
    except (ConfigError, RecipeError, PlanError, CheckpointError, RunDirBusy, CheckpointWriteError) as err:
        # These name the culprit and what is allowed; a traceback of our own frames above them would bury that.
        get_logger("ov_train").error("%s", err)
        sys.exit(1)
    finally:
        # Whatever ended train(), no loader worker may keep this process from exiting (a no-op when none is left).
        stop_loader_workers()


def main(argv: list[str] | None = None) -> int:
    run_hydra(_train, argv)
    return 0
