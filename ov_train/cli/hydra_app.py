"""The one way a command composes its config: Hydra's own command line on the shipped conf/ and its schema."""
from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
from ov_train.resources import CONF_DIR


def run_hydra(task: Callable[[DictConfig], None], argv: list[str] | None = None) -> None:
    """`task(cfg)` on the config Hydra composes from `argv` (overrides, --config-dir, --cfg, -m), which stands in for
    sys.argv[1:] meanwhile; None for a run that starts ranks: Lightning starts them with this process's sys.argv."""
    saved = sys.argv
    sys.argv = saved if argv is None else [saved[0], *argv]
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)()
    finally:
        sys.argv = saved
