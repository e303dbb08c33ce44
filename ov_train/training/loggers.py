"""The plan's logger -> a Lightning logger (W&B offline by default, CSV, TensorBoard, MLflow, or none).

Names and groups are the plan's (ov_train.config.run_plan.logger_plan: `<stage>-<model>`, plus `-<job number>`
in a multirun, and the job's swept values in the dashboards' run names). File loggers write under the run
directory: `csv/<name>/metrics.csv`, `tensorboard/<name>/`, `mlflow.db` (MLflow's SQLite store, unless
`logger.tracking_uri` names a server).
"""
from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ov_train.config.run_plan import LoggerPlan
from ov_train.utils.lightning_internals import wandb_init_arguments
from ov_train.utils.redact import redact_text

MLFLOW_DB = "mlflow.db"  # logger=mlflow's store in the run directory: `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`


class RunWandbLogger(WandbLogger):
    """Closes its W&B run when the fit ends: the jobs of a multirun share one process, and each needs its own run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Lightning 2.6 always passes `anonymous` (None here) to wandb.init, which warns that the setting is gone.
        wandb_init_arguments(self).pop("anonymous", None)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        self.experiment.finish(exit_code=0 if status == "success" else 1)


def build_logger(plan: LoggerPlan, run_dir: Path, config: dict):
    """`config`: the resolved config, so runs of a sweep compare by the values they differ in."""
    if plan.kind == "wandb":
        # W&B records the command line in its run metadata; one naming a URL with credentials keeps none.
        import wandb

        argv = " ".join(sys.argv)
        settings = {"settings": wandb.Settings(x_disable_meta=True)} if redact_text(argv) != argv else {}
        return RunWandbLogger(
            project=plan.config.project, name=plan.display_name, group=plan.group, mode=plan.config.mode, save_dir=str(run_dir),
            config=config, **settings,
        )
    if plan.kind == "csv":
        return CSVLogger(str(run_dir), name="csv", version=plan.run_name)
    if plan.kind == "tensorboard":
        logger = TensorBoardLogger(str(run_dir), name="tensorboard", version=plan.run_name, default_hp_metric=False)
    elif plan.kind == "mlflow":
        uri, artifacts = plan.config.tracking_uri, None
        if not uri:
            # A SQLite store in the run directory: MLflow 3 keeps its file store in maintenance (its client and UI
            # refuse one without MLFLOW_ALLOW_FILE_STORE), the SQL store is the supported local one. Artifacts go
            # beside it, not to ./mlruns in whatever directory the run started from.
            uri = f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
            artifacts = (run_dir / "mlflow_artifacts").resolve().as_uri()
        logger = MLFlowLogger(
            experiment_name=plan.config.experiment, run_name=plan.display_name, tracking_uri=uri, tags={"group": plan.group},
            artifact_location=artifacts,
        )
    else:
        return False
    logger.log_hyperparams(config)
    return logger
