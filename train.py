"""Entry point: `python train.py stage=onevision` (Hydra composes conf/config.yaml)."""
import hydra
from omegaconf import DictConfig

from ov_train.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
