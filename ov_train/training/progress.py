"""The progress bar: optimizer steps out of trainer.max_steps with tqdm's ETA, on a terminal only.

Training streams have no epochs (Lightning's stock bars read `Epoch 0/-2`) and held-out streams no length
(`70/--`), so the bar counts steps across loader restarts and shows validation as a count of batches. Without
a terminal (a SLURM log) the bar stays off: TrainingMetrics logs a `step N/max_steps (eta ...)` line instead.
"""
from __future__ import annotations

import sys

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    TRAIN_FORMAT = "{desc} {n_fmt}/{total_fmt} steps |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    VALIDATION_FORMAT = "{desc}: {n_fmt} batches [{elapsed}, {rate_fmt}]"

    def __init__(self):
        super().__init__()
        if not sys.stdout.isatty():
            self.disable()

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
        if bar is None or bar.disable:
            return
        if self.refresh_rate > 0 and (step % self.refresh_rate == 0 or step == bar.total):  # as TQDMProgressBar's
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar runs on into the next loader pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.val_progress_bar.reset(total=None)
            self.val_progress_bar.set_description("sanity check" if trainer.sanity_checking else "validation")
