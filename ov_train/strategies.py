"""The `strategy` group -> a Lightning strategy: the one place parallelism is chosen."""
from __future__ import annotations


def build_strategy(cfg):
    return cfg.strategy.name
