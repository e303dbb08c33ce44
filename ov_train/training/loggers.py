"""The `logger` group -> a Lightning logger (W&B offline by default, CSV, or none), named and grouped by run.

Runs are named `<stage>-<model>`, plus `-<job number>` inside a Hydra multirun. They are grouped by
the sweep directory in a multirun (every job of one sweep side by side), else by stage, unless
`logger.group` says otherwise. The CSV logger writes to `<run_dir>/csv/<name>/metrics.csv`.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf


class RunWandbLogger(WandbLogger):
    """Closes its W&B run when the fit ends: the jobs of a multirun share one process, and each needs its own run."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.experiment.finish(exit_code=0 if status == "success" else 1)


def run_identity(cfg) -> tuple[str, str]:
    """(name, group) of this run for the dashboards."""
    name, group = f"{cfg.stage.name}-{cfg.model.name}", cfg.stage.name
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra = HydraConfig.get()
        name, group = f"{name}-{hydra.job.num}", str(hydra.sweep.dir)
    return name, cfg.logger.get("group") or group


def build_logger(cfg, run_dir: Path):
    kind = cfg.logger.name
    name, group = run_identity(cfg)
    if kind == "wandb":
        return RunWandbLogger(
            project=cfg.logger.project,
            name=name,
            group=group,
            mode=cfg.logger.mode,
            save_dir=str(run_dir),
            # The resolved config, so runs of a sweep compare by the values they differ in.
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if kind == "csv":
        return CSVLogger(str(run_dir), name="csv", version=name)
    return False
