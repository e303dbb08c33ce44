"""Shared fixtures: the real config composed with test overrides, a tiny model, a small synthetic data set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep every cache (tokenizer, synthetic shards, W&B) inside the test session's temp dir."""
    cache = tmp_path_factory.mktemp("ov_cache")
    os.environ["OV_TRAIN_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


def compose_config(overrides: list[str], run_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir) if run_dir else None
    return cfg


SMALL_DATA = [
    "data.synthetic.train_per_subset=64",
    "data.synthetic.val_per_subset=16",
    "data.num_workers=0",
    "data.batch_size=4",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def small_data_root(tmp_path_factory):
    from ov_train.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, train_per_subset=64, val_per_subset=16, image_px=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(_offline_cache):
    from ov_train.model.build import build_model

    cfg = compose_config([])
    return build_model(cfg.model, _offline_cache)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg)
