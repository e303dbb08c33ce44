"""The one way a command composes its config: Hydra's own command line on the shipped conf/ and its schema."""
from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
from ov_train.resources import CONF_DIR


def run_hydra(task: Callable[[DictConfig], None], argv: list[str] | None = None) -> None:
    """`task(cfg)` on the config Hydra composes from `argv` (default: the process's command line): overrides,
    --config-dir, --cfg, --help, -m. `argv` stands in for sys.argv[1:] while Hydra reads it; a run that starts
    more ranks gets argv=None, since Lightning starts them with this process's own command line."""
    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)
    if argv is None:
        app()
        return
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        app()
    finally:
        sys.argv = saved
