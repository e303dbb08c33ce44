"""Callbacks every run gets: checkpoints that survive a kill, a save on SIGTERM, dashboards, stream state."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ov_train.training.metrics import TrainingMetrics, ValidationPredictions
from ov_train.training.stream_state import StreamState
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file beside its target, syncs it, then renames it over the target.

    The rename is atomic, so a job killed mid-save leaves the previous checkpoint whole; at worst a
    stale `.<name>.partial` remains, which the next save overwrites. (The stock TorchCheckpointIO
    serialises into memory, writes the system temp dir and moves the file: from a node's /tmp to a
    shared run directory that move is a copy onto the target, which a kill truncates.)
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        # The rename itself lives in the directory: sync it too, or a crash could still undo it.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class AtomicCheckpoints(Callback):
    """Routes the strategy's single-file checkpoint saves through AtomicCheckpointIO.

    Only the stock TorchCheckpointIO is replaced: sharded strategies (DeepSpeed, sharded FSDP) write
    directories through their own code, and a user-chosen CheckpointIO plugin is kept.
    """

    def setup(self, trainer, pl_module, stage):
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class SaveOnSigterm(Callback):
    """On SIGTERM (preemption, scancel, a time limit's warning) save `path` and let the process exit 0.

    Lightning notes the signal, finishes the current optimizer step, agrees across ranks, and raises
    SIGTERMException at the step boundary; this saves there, so the checkpoint resumes cleanly.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s at step %d; exiting", self.path, trainer.global_step)


def build_callbacks(cfg, run_dir: Path) -> list:
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0)
    last = Path(checkpoints.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    return [
        checkpoints,
        AtomicCheckpoints(),
        SaveOnSigterm(last),
        TrainingMetrics(cfg.metrics.peak_tflops),
        ValidationPredictions(run_dir / "predictions", cfg.metrics.predictions, cfg.eval.generate, cfg.eval.max_new_tokens),
        StreamState.for_run(cfg, run_dir),
    ]
