"""Checkpoints while training runs: `last.ckpt` every checkpoint.every_n_steps and/or every_minutes, rewritten in
place on resume, plus the `keep` most recent as step=<N>.ckpt; the checkpoint keys are checked up front."""
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from ov_train.config import ConfigError, validate
from ov_train.training.callbacks import AtomicCheckpoints, PeriodicCheckpoint, build_callbacks
from tests.conftest import compose_config


class Saves(Callback):
    """The global step of every checkpoint written."""

    def __init__(self):
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(checkpoint["global_step"])


def fit(directory: Path, max_steps: int, ckpt_path=None, **cadence) -> list[int]:
    saves = Saves()
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[PeriodicCheckpoint(directory, **cadence), AtomicCheckpoints(), saves],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return saves.steps


def test_every_n_steps_keeps_last_and_the_most_recent(tmp_path):
    assert fit(tmp_path, 7, every_n_steps=2, every_minutes=None, keep=2) == [2, 2, 4, 4, 6, 6]  # step=N, then last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6

    # Resumed in the same directory: last.ckpt is rewritten, never copied to last-v1.ckpt.
    assert fit(tmp_path, 9, tmp_path / "last.ckpt", every_n_steps=2, every_minutes=None, keep=2) == [8, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8


def test_minutes_and_steps_both_trigger(tmp_path):
    # A time interval shorter than a step saves at every step, whatever every_n_steps says.
    assert fit(tmp_path / "timed", 3, every_n_steps=100, every_minutes=1e-9, keep=0) == [1, 2, 3]
    assert fit(tmp_path / "stepped", 5, every_n_steps=2, every_minutes=60, keep=0) == [2, 4]  # run.py saves the end
    assert [p.name for p in (tmp_path / "stepped").iterdir()] == ["last.ckpt"]


def test_the_default_run_writes_checkpoints_while_it_trains(tmp_path):
    cfg = compose_config([], run_dir=tmp_path)
    (periodic,) = [c for c in build_callbacks(cfg, tmp_path) if isinstance(c, PeriodicCheckpoint)]
    assert 0 < periodic._every_n_train_steps < cfg.trainer.max_steps
    assert periodic._train_time_interval.total_seconds() == 60 * cfg.checkpoint.every_minutes


def test_bad_checkpoint_keys_are_named(tmp_path):
    cfg = compose_config(
        ["checkpoint.every_n_steps=0", "checkpoint.every_minutes=soon", "checkpoint.keep=-1", "checkpoint.trust=maybe"],
        run_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for text in (
        "checkpoint.every_n_steps=0 must be a positive integer or null",
        "checkpoint.every_minutes='soon' must be a positive number or null",
        "checkpoint.keep=-1 must be an integer >= 0",
        "checkpoint.trust='maybe' must be true or false",
    ):
        assert text in str(err.value)
    validate(compose_config(["checkpoint.every_n_steps=null", "checkpoint.every_minutes=null"], run_dir=tmp_path))
