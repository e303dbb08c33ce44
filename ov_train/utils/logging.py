"""Rank-aware logging: every rank logs warnings, only rank 0 logs info."""
from __future__ import annotations

import logging
import os
import warnings

import torch


def rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class _RankZeroInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroInfo) for f in logger.filters):
        logger.addFilter(_RankZeroInfo())
    return logger


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def settle_deepspeed_accelerator() -> None:
    """Before DeepSpeed is imported (checkpoint reading imports it for its pickled classes, save_pretrained through
    accelerate): on a machine without CUDA it would fall back to the CPU and warn that it did; that choice is made
    explicit (DS_ACCELERATOR=cpu), so it need not warn."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def tidy_library_output() -> None:
    """Once per process, before the Trainer is built: what libraries print that is not about this run.

    - `lightning` gives its package logger a console handler of its own *and* lets records through to the root
      logger, which under Hydra prints them again (and writes train.log): its own handler goes when the root has one.
    - Lightning's Trainer advertises cloud services at info level ("💡 Tip: ... litlogger"): filtered out.
    - Lightning 2.6 builds torch's deprecated `LeafSpec` in its own pytree helper (a FutureWarning per run that no
      change of ours can fix): ignored.
    - Under trainer.overfit_batches Lightning takes every iterable loader for a shuffled one and says it turns
      shuffling off; ours shuffle inside the stream, which restarts at the same point each epoch: ignored.
    - Lightning's ModelCheckpoint warns, under manual optimization, that a step-triggered checkpoint holds the
      weights after the optimizer step (with a page of example code): that is the state ov_train resumes from, a
      checkpoint falling between steps (training/step.py): ignored.
    - DeepSpeed's accelerator notice (settle_deepspeed_accelerator): Lightning's DeepSpeed strategy imports it too.
    """
    package = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in [h for h in package.handlers if type(h) is logging.StreamHandler]:
            package.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    settle_deepspeed_accelerator()
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"You requested to overfit but enabled \w+ dataloader shuffling")
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
