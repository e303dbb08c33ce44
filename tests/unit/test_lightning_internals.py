"""The private Lightning names ov_train relies on (ov_train/utils/lightning_internals.py), pinned: each test fails the
day a Lightning release renames or changes one, before a run would go wrong."""
import inspect
from datetime import timedelta

import lightning as L
import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from ov_train.utils.lightning_internals import (
    HookedModelCheckpoint,
    time_interval_seconds,
    trainer_precisions,
    wandb_init_arguments,
)


def test_model_checkpoint_keeps_the_private_names_the_adapter_sets_and_reads():
    stock = ModelCheckpoint(train_time_interval=timedelta(minutes=1))
    assert vars(stock)["_every_n_train_steps"] == 0 and vars(stock)["_last_global_step_saved"] == 0
    assert list(inspect.signature(ModelCheckpoint._save_checkpoint).parameters) == ["self", "trainer", "filepath"]


class Recording(HookedModelCheckpoint):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: list[tuple[int, str]] = []

    def write(self, trainer, filepath, save):
        self.written.append((trainer.global_step, filepath))
        save(filepath)


def test_a_step_trigger_beside_the_time_trigger_saves_through_the_write_hook(tmp_path):
    checkpoint = Recording(dirpath=tmp_path, filename="step={step}", save_last=True, save_top_k=0,
                           train_time_interval=timedelta(hours=1), every_n_epochs=0, enable_version_counter=False)
    checkpoint.set_every_n_steps(2)
    trainer = L.Trainer(max_steps=5, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(BoringModel())
    assert [step for step, _ in checkpoint.written] == [2, 4]  # the step trigger; the hour never came
    assert all(path.endswith("last.ckpt") for _, path in checkpoint.written)
    assert checkpoint.last_saved_step == 4
    assert (tmp_path / "last.ckpt").is_file()


def test_trainer_precisions_are_read_from_lightning():
    assert {"32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"} <= set(trainer_precisions())
    assert "bf17" not in trainer_precisions()
    L.Trainer(precision=trainer_precisions()[0], accelerator="cpu", logger=False)  # the Trainer takes them


def test_time_intervals_are_read_as_the_trainer_reads_them():
    assert time_interval_seconds("00:00:10:00") == 600
    assert time_interval_seconds({"minutes": 2}) == 120
    with pytest.raises((ValueError, MisconfigurationException)):
        time_interval_seconds("1:00")


def test_wandb_init_arguments_are_the_ones_the_logger_starts_its_run_with():
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(name="probe", offline=True)
    arguments = wandb_init_arguments(logger)
    assert arguments["name"] == "probe" and "anonymous" in arguments
    arguments["project"] = "changed"
    assert wandb_init_arguments(logger)["project"] == "changed"  # the dict itself, not a copy
