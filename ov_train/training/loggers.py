"""The `logger` group -> a Lightning logger (W&B offline by default, CSV, TensorBoard, MLflow, or none), named and
grouped by run.

Runs are named `<stage>-<model>`, plus `-<job number>` inside a Hydra multirun, where the dashboards' run names
also carry the job's values of the swept keys (`onevision-tiny-1 stage.parts.llm=2e-5`). They are grouped by the
sweep directory in a multirun (every job of one sweep side by side), else by stage, unless `logger.group` says
otherwise (MLflow, which has no groups, gets it as the `group` tag). File loggers write under the run directory:
`csv/<name>/metrics.csv`, `tensorboard/<name>/`, `mlruns/` (MLflow's local file store, unless
`logger.tracking_uri` names a server).
"""
from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

LOGGERS = ("wandb", "csv", "tensorboard", "mlflow", "none")
# What the dashboards beyond W&B and CSV import (any one of them), installed with the `loggers` extra.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def missing_package(kind: str) -> str | None:
    """The package `logger=kind` needs and lacks here, or None."""
    from importlib.util import find_spec

    needed = PACKAGES.get(kind, ())
    return needed[0] if needed and not any(find_spec(name) for name in needed) else None


class RunWandbLogger(WandbLogger):
    """Closes its W&B run when the fit ends: the jobs of a multirun share one process, and each needs its own run."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.experiment.finish(exit_code=0 if status == "success" else 1)


def _multirun():
    return HydraConfig.get() if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN else None


def run_identity(cfg) -> tuple[str, str]:
    """(name, group) of this run for the dashboards."""
    name, group = f"{cfg.stage.name}-{cfg.model.name}", cfg.stage.name
    if hydra := _multirun():
        name, group = f"{name}-{hydra.job.num}", str(hydra.sweep.dir)
    return name, cfg.logger.get("group") or group


def swept_overrides(hydra) -> list[str]:
    """This multirun job's overrides of the keys the sweep varies (`key=value`), in command-line order.

    A job only sees its own overrides; which keys were swept (`k=a,b`, ranges, choices, or the sweeper's
    `params`) is in the sweep's multirun.yaml, which Hydra writes before it launches any job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = OmegaConf.load(Path(hydra.sweep.dir) / "multirun.yaml").hydra
    except OSError:
        return []
    parser = OverridesParser.create()
    swept = {o.key_or_group for o in parser.parse_overrides(list(sweep.overrides.task)) if o.is_sweep_override()}
    swept |= set(sweep.sweeper.get("params") or {})
    return [o.input_line for o in parser.parse_overrides(list(hydra.overrides.task)) if o.key_or_group in swept]


def display_name(name: str) -> str:
    """The dashboards' run name: `name`, and inside a multirun the job's values of the swept keys."""
    hydra = _multirun()
    swept = swept_overrides(hydra) if hydra else []
    return f"{name} {','.join(swept)}" if swept else name


def build_logger(cfg, run_dir: Path):
    kind = cfg.logger.name
    name, group = run_identity(cfg)
    # The resolved config, so runs of a sweep compare by the values they differ in.
    config = OmegaConf.to_container(cfg, resolve=True)
    if kind == "wandb":
        return RunWandbLogger(
            project=cfg.logger.project, name=display_name(name), group=group, mode=cfg.logger.mode,
            save_dir=str(run_dir), config=config,
        )
    if kind == "csv":
        return CSVLogger(str(run_dir), name="csv", version=name)
    if kind == "tensorboard":
        logger = TensorBoardLogger(str(run_dir), name="tensorboard", version=name, default_hp_metric=False)
    elif kind == "mlflow":
        uri = cfg.logger.tracking_uri
        if not uri:
            # MLflow 3 keeps its file store in maintenance and asks for this opt-in; its SQL store would need
            # SQLAlchemy and Alembic, which mlflow-skinny (the `loggers` extra) leaves out.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        logger = MLFlowLogger(
            experiment_name=cfg.logger.experiment, run_name=display_name(name), tracking_uri=uri, tags={"group": group}
        )
    else:
        return False
    logger.log_hyperparams(config)
    return logger
