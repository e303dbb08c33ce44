"""Rank-aware logging: every rank logs warnings, only rank 0 logs info."""
from __future__ import annotations

import logging
import os


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
