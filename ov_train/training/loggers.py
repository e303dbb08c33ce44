"""The plan's logger -> a Lightning logger (W&B offline by default, CSV, or none), named and grouped by run.

Names and groups are the plan's (ov_train.config.run_plan: `<stage>-<model>`, plus `-<job number>` in a
multirun). The CSV logger writes to `<run_dir>/csv/<name>/metrics.csv`.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ov_train.config.run_plan import LoggerPlan


class RunWandbLogger(WandbLogger):
    """Closes its W&B run when the fit ends: the jobs of a multirun share one process, and each needs its own run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Lightning 2.6 always passes `anonymous` (None here) to wandb.init, which warns that the setting is gone.
        self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.experiment.finish(exit_code=0 if status == "success" else 1)


def build_logger(plan: LoggerPlan, run_dir: Path, config: dict):
    if plan.kind == "wandb":
        return RunWandbLogger(
            project=plan.project,
            name=plan.run_name,
            group=plan.group,
            mode=plan.mode,
            save_dir=str(run_dir),
            # The resolved config, so runs of a sweep compare by the values they differ in.
            config=config,
        )
    if plan.kind == "csv":
        return CSVLogger(str(run_dir), name="csv", version=plan.run_name)
    return False
