"""The composed config outside a `@hydra.main` run (tests, the benchmark, the planner): the shipped configs,
the same schema and the same overrides as `ov-train`."""
from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
from ov_train.resources import CONF_DIR


def compose(overrides=(), run_dir: str | Path | None = None) -> DictConfig:
    """conf/config.yaml with `overrides`; `run_dir` stands in for Hydra's run directory (null without one).
    Inside a running `ov-train` (or a process it forked) Hydra is set up already: its search path is used, the
    user's --config-dir included."""
    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir else None
    return cfg
