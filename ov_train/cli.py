"""`ov-train`: training as `python train.py` runs it, or `ov-train plan ...`, the memory and time planner."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def _train(cfg: DictConfig) -> None:
    from ov_train.run import train

    train(cfg)


def main() -> None:
    if sys.argv[1:2] == ["plan"]:
        from ov_train.planner.cli import main as plan_main

        sys.exit(plan_main(sys.argv[2:]))
    _train()


if __name__ == "__main__":
    main()
