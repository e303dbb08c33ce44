"""Linear warmup then cosine decay to zero, as a multiplier of each group's learning rate."""
import math


def warmup_cosine(step: int, total_steps: int, warmup_ratio: float) -> float:
    warmup = max(1, round(total_steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
