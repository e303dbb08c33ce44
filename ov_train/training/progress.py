"""The progress bar: optimizer steps out of trainer.max_steps with tqdm's ETA, on a terminal only.

Training streams have no epochs (Lightning's stock bars read `Epoch 0/-2`) and held-out streams no length
(`70/--`), so the bar counts steps across loader restarts and shows validation as a count of batches. Without
a terminal (a SLURM log) the bar stays off: TrainingMetrics logs a `step N/max_steps (eta ...)` line instead.
"""
from __future__ import annotations

import logging
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm


class _AboveTheBars:
    """A console stream whose writes tqdm puts above its bars (clear the bar, write, redraw it): a log line written
    while a bar is drawn starts on a line of its own instead of being glued to the bar's line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def console_handlers() -> list[logging.StreamHandler]:
    """The root logger's console handlers (Hydra's), not its files."""
    return [h for h in logging.getLogger().handlers
            if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]


def logs_above_bars(handlers: list[logging.StreamHandler]):
    """Route `handlers` through _AboveTheBars; returns what puts them back."""
    streams = [(h, h.stream) for h in handlers if not isinstance(h.stream, _AboveTheBars)]
    for handler, stream in streams:
        handler.setStream(_AboveTheBars(stream))

    def restore() -> None:
        for handler, stream in streams:
            handler.setStream(stream)
    return restore


class StepProgressBar(TQDMProgressBar):
    TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} steps |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    VALIDATION_FORMAT = "{desc}: {n_fmt} batches [{elapsed}, {rate_fmt}]"

    def __init__(self):
        super().__init__()
        self._restore_logs = None
        if not sys.stdout.isatty():
            self.disable()

    def on_fit_start(self, trainer, pl_module):
        if self.is_enabled and self._restore_logs is None:
            self._restore_logs = logs_above_bars(console_handlers())

    def teardown(self, trainer, pl_module, stage):
        if self._restore_logs is not None:
            self._restore_logs()
            self._restore_logs = None
        super().teardown(trainer, pl_module, stage)

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format, bar.unit = self.TRAIN_FORMAT, "step"
        return bar

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.bar_format = self.VALIDATION_FORMAT
        return bar

    def on_train_epoch_start(self, trainer, *_):
        # One bar for the whole run: a stream's "epochs" are only loader restarts, and a resume starts midway.
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = trainer.global_step
            bar.set_description("train")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar runs on into the next loader pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.val_progress_bar.reset(total=None)
            self.val_progress_bar.set_description("sanity check" if trainer.sanity_checking else "validation")
