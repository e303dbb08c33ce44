"""The only place ov_train touches Lightning's private names, where its public API offers nothing (pinned by
tests/unit/test_lightning_internals.py, which fails the day one of them changes; tests/unit/test_lightning_public_api.py
fails on a private Lightning name anywhere else in the package).

- ModelCheckpoint takes one trigger in its constructor (steps, time or epochs); checkpoints every N steps *and* every
  M minutes need the step trigger set after it, and a hook around each of its writes (to keep each one whole).
- WandbLogger passes every wandb.init argument it was built with, `anonymous` included, which wandb now warns about.
- A save from on_train_batch_start (SIGTERM) must not count the batch just fetched as started: the loop's batch
  counters say where a resume stands, and Lightning rolls back only the epoch's ones, not the run's total.
- The Trainer's accepted precision values and its time-based val_check_interval parsing, for checking a config
  before any work instead of failing once the model is built.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from lightning.pytorch.callbacks import ModelCheckpoint


class HookedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with a step trigger besides its constructor's one, the step it last saved at, and every write
    going through `write`."""

    def set_every_n_steps(self, every_n_steps: int | None) -> None:
        # Read by ModelCheckpoint.on_train_batch_end next to the time trigger: either one due saves.
        self._every_n_train_steps = int(every_n_steps or 0)

    @property
    def last_saved_step(self) -> int:
        return self._last_global_step_saved

    def write(self, trainer, filepath: str, save: Callable[[str], None]) -> None:
        """Writes one checkpoint file (or directory) through `save(path)`; override to write elsewhere first."""
        save(filepath)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        self.write(trainer, filepath, lambda target: super(HookedModelCheckpoint, self)._save_checkpoint(trainer, str(target)))


def unfetch_pending_batch(trainer) -> None:
    """Before a save from on_train_batch_start: un-count the batch the training loop fetched but did not start, so
    the checkpoint says "between steps". Otherwise the run's total batch count stays one ahead after a resume (Lightning
    resets only the epoch's counters on restart), and validation and logging, which count from it, run one step early."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    for tracker in (progress.total, progress.current):
        if tracker.ready == tracker.started + 1:
            tracker.ready -= 1


def trainer_precisions() -> list[str]:
    """The precision values Lightning's Trainer accepts, read from its own type (as strings: the schema's type)."""
    from lightning.fabric.connector import _PRECISION_INPUT

    return [str(value) for literal in get_args(_PRECISION_INPUT) for value in get_args(literal)]


def time_interval_seconds(interval) -> float:
    """Lightning's reading of a time-based val_check_interval ('DD:HH:MM:SS' or timedelta keyword arguments), in
    seconds; raises as the Trainer would on a bad one."""
    from lightning.pytorch.trainer.setup import _parse_time_interval_seconds

    return _parse_time_interval_seconds(interval)


def wandb_init_arguments(logger) -> dict:
    """The keyword arguments a WandbLogger hands to wandb.init when it starts its run (changes here apply)."""
    return logger._wandb_init
