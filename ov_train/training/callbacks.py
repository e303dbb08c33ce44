"""Callbacks every run gets: checkpointing into the run directory."""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


def build_callbacks(cfg, run_dir: Path) -> list:
    return [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0)]
