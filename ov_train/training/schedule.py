"""Linear warmup then cosine decay to zero, as a multiplier of each group's learning rate.

Two warmups (stage.warmup_schedule, config/reproduce.py): ov_train's, round(ratio x T) steps whose first already
trains at lr / W, and transformers' (`get_cosine_schedule_with_warmup`, which the public LLaVA-NeXT trainer runs
with W = ceil(ratio x T)), whose first step runs at lr 0. They differ by a step of warmup at most (282 vs 281 at
T = 9,375) and by one step's shift inside it.
"""
import math
from functools import partial

import torch
from transformers import get_cosine_schedule_with_warmup


def warmup_cosine(step: int, total_steps: int, warmup_ratio: float) -> float:
    warmup = max(1, round(total_steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer, total_steps: int, warmup_ratio: float, rule: str = "ov_train"):
    """The LambdaLR of `rule`: `ov_train` (warmup_cosine) or `transformers` (the public trainer's)."""
    if rule == "transformers":
        return get_cosine_schedule_with_warmup(optimizer, math.ceil(total_steps * warmup_ratio), total_steps)
    if rule != "ov_train":
        raise ValueError(f"warmup schedule {rule!r}; allowed: ov_train, transformers")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, total_steps=total_steps, warmup_ratio=warmup_ratio))
