"""Writing checkpoints: atomically (a kill mid-save leaves the previous one whole), on a cadence (every N steps and
every M minutes, keeping the K most recent), and on SIGTERM or Ctrl-C between two optimizer steps."""
from __future__ import annotations

import os
import shutil
import signal
import threading
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
)
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ov_train.checkpoints.paths import KEPT, previous_of
from ov_train.checkpoints.safe_load import load_file
from ov_train.utils.lightning_internals import HookedModelCheckpoint, unfetch_pending_batch
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint the filesystem would not take (no space left, a file-size limit): its target is as before."""

    def __str__(self) -> str:
        return f"{super().__str__()}: the checkpoint was not written; {Path(self.filename).name} is as it was before"


def _os_error(err: BaseException) -> OSError | None:
    """The OSError (with an errno) behind `err`, itself or in its chain of causes; None if none."""
    seen = set()
    while isinstance(err, Exception) and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file beside its target, syncs it, then renames it over the target.

    The rename is atomic, so a job killed mid-save leaves the previous checkpoint whole; at worst a
    stale `.<name>.partial` remains, which the next save overwrites. (The stock TorchCheckpointIO
    serialises into memory, writes the system temp dir and moves the file: from a node's /tmp to a
    shared run directory that move is a copy onto the target, which a kill truncates.)

    Loading (resume) unpickles tensors and plain data only, unless `trust`: Lightning 2.6 passes
    weights_only=None, which leaves it to torch's default (on since torch 2.6, off under the environment's
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD).
    """

    def __init__(self, trust: bool = False):
        super().__init__()
        self.trust = trust

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_file(path, trust=self.trust, map_location=map_location, mmap=False)

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
        except BaseException as err:
            partial.unlink(missing_ok=True)
            cause = _os_error(err)
            if cause is None:
                raise
            # torch.save reports a failed write (a full disk, a file-size limit) as an "enforce fail" of its zip
            # writer, the OSError only in its context.
            raise CheckpointWriteError(cause.errno, cause.strerror, str(path)) from None
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

    def __init__(self, trust: bool = False):
        self.trust = trust

    def setup(self, trainer, pl_module, stage):
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(self.trust)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_whole(trainer, path, save=None) -> None:
    """`save(path)` (trainer.save_checkpoint by default) so that a kill at any moment leaves a whole checkpoint.

    Single files go through AtomicCheckpointIO. DeepSpeed and FSDP write from every rank, in place, often a
    directory: they write beside the target instead, then rank 0 moves the target to `.<name>.previous`,
    renames the new one over it and deletes the previous one. A kill between those renames leaves only the
    previous checkpoint, which ckpt_path=auto (checkpoints/paths.py) then resumes from.
    """
    # weights_only=False said outright: a whole checkpoint (optimizer, loops, stream state) is what resumes need,
    # and Lightning logs "`weights_only` was not set" at every save that leaves it to its default.
    save = save or (lambda target: trainer.save_checkpoint(target, weights_only=False))
    path = Path(path)
    if not isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)):
        save(path)
        return
    partial, previous = path.with_name(f".{path.name}.partial"), previous_of(path)
    if trainer.is_global_zero:
        _remove(partial)  # what a save killed midway left
    trainer.strategy.barrier("save_whole")
    save(partial)  # every rank writes its part; Lightning's save ends on a barrier
    if trainer.is_global_zero:
        if path.exists():
            _remove(previous)
            os.replace(path, previous)
        os.replace(partial, path)
        _remove(previous)
    trainer.strategy.barrier("save_whole")


class PeriodicCheckpoint(HookedModelCheckpoint):
    """`last.ckpt` every `every_n_steps` optimizer steps and every `every_minutes` (either may be off), overwritten
    in place, plus the `keep` most recent earlier ones as `step=N.ckpt`.

    Lightning's ModelCheckpoint does the work: the triggers (ranks agree on the time one), `last`, pruning to
    the top `keep` by step. Its version counter is off, so a resumed run rewrites `last.ckpt` instead of adding
    `last-v1.ckpt`; every save goes through save_whole, so each rewrite is whole or not at all.
    """

    def __init__(self, dirpath: Path, every_n_steps: int | None, every_minutes: float | None, keep: int = 0):
        super().__init__(
            dirpath=dirpath, filename=KEPT, auto_insert_metric_name=False,
            # Top-k by step with mode=max keeps the most recent; with keep=0 only `last` is written.
            monitor="step" if keep else None, mode="max", save_top_k=keep, save_last=True,
            train_time_interval=timedelta(minutes=every_minutes) if every_minutes else None,
            every_n_epochs=0, enable_version_counter=False,
        )
        # ModelCheckpoint's constructor takes one trigger; its on_train_batch_end saves when either is due.
        self.set_every_n_steps(every_n_steps)

    @property
    def state_key(self) -> str:
        # One per run, so a resume that changes the cadence still finds (and prunes) the kept checkpoints.
        return type(self).__name__

    def saved_at(self, step: int) -> bool:
        return self.last_saved_step == step

    def write(self, trainer, filepath, save):
        save_whole(trainer, filepath, save)


class SaveOnSigterm(Callback):
    """On SIGTERM (preemption, scancel, a time limit's warning) save `path` and let the process exit 0; on the
    first Ctrl-C (SIGINT) the same, exiting 130 as an interrupted command does (a second Ctrl-C stops at once,
    unsaved, as Lightning does).

    The signal is only noted when it arrives; before the next optimizer step the ranks agree (one all-reduce,
    the same call on every rank) and all stop there, the step in progress finished, and this saves, so the
    checkpoint resumes cleanly. Lightning's own handler is replaced for the fit: it broadcasts from inside the
    signal handler, that is in the middle of whatever collective the interrupted rank was running, which
    desynchronises the ranks (gloo aborts on a size mismatch; NCCL hangs).
    """

    EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pending: int | None = None  # the signal noted
        self._trainer = None

    def on_train_start(self, trainer, pl_module):
        # Lightning installs its handlers just before training starts (and restores the earlier ones at teardown).
        self._trainer, self._pending = trainer, None
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                signal.signal(signum, self._notice)

    def _notice(self, signum, frame) -> None:
        if self._pending is None:
            name = signal.Signals(signum).name
            log.warning("%s: saving %s once the step in progress ends, then exiting", name, self.path)
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # ranks Lightning started itself hear of it too
                launcher.kill(signum)
            self._pending = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Each batch is one optimizer step (training/step.py): this is between steps, so the saved state resumes exactly.
        pending = self._pending is not None
        if trainer.world_size > 1:
            flag = torch.tensor(float(pending), device=pl_module.device)
            pending = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if pending:
            # Before the next step, on every rank at once (the batch is not consumed: the stream resumes with it).
            # SIGTERMException is a SystemExit: its code is the process's exit status.
            raise SIGTERMException(self.EXIT_CODES.get(self._pending, 0))

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException):
            unfetch_pending_batch(trainer)  # raised before the fetched batch started: the save is between steps
            save_whole(trainer, self.path)
            name = signal.Signals(self._pending or signal.SIGTERM).name
            log.warning("%s: saved %s at step %d; exiting", name, self.path, trainer.global_step)
