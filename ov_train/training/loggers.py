"""The `logger` group -> a Lightning logger (W&B offline by default, CSV, or none)."""
from __future__ import annotations

from pathlib import Path


def build_logger(cfg, run_dir: Path):
    name = cfg.logger.name
    run_name = f"{cfg.stage.name}-{cfg.model.name}"
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=cfg.logger.project,
            name=run_name,
            group=cfg.logger.group or cfg.stage.name,
            mode=cfg.logger.mode,
            save_dir=str(run_dir),
        )
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="csv")
    return False
