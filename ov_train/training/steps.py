"""How long a run is and what one step holds, when the config counts in samples and epochs.

data.samples_per_step: a global batch in samples (every rank takes samples_per_step / world size of them per
step, in token-budget micro-batches: ov_train.data.step_batches, ov_train.training.accumulate).
data.epochs: passes over the recipe's sample counts (`samples:` per source); trainer.max_steps is then derived
as ceil(epochs x samples / samples_per_step) and logged.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from ov_train.data.recipe import RecipeError, load_recipe
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


def _world_size(trainer) -> int | None:
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list):
        devices = len(devices)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) and devices > 0 else None


def _recipe(cfg):
    return load_recipe(str(cfg.data.recipe), Path(cfg.data.get("root") or "."), require_shards=False)


def step_problems(cfg) -> list[str]:
    data = cfg.data
    per_step, epochs = data.get("samples_per_step"), data.get("epochs")
    problems = []
    if per_step is not None:
        if not isinstance(per_step, int) or isinstance(per_step, bool) or per_step < 1:
            problems.append(f"data.samples_per_step={per_step!r} must be an integer >= 1 (a global batch in samples) or null")
        else:
            world = _world_size(cfg.trainer)
            if world and per_step % world:
                problems.append(
                    f"data.samples_per_step={per_step} does not divide over {world} processes (trainer.num_nodes x"
                    f" trainer.devices); every rank takes the same share"
                )
        if cfg.trainer.get("accumulate_grad_batches", 1) != 1:
            problems.append("trainer.accumulate_grad_batches must be 1 with data.samples_per_step (the step bundles accumulate)")
    if epochs is not None:
        if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or not 0 < epochs < math.inf:
            problems.append(f"data.epochs={epochs!r} must be a number > 0 or null")
        elif per_step is None:
            problems.append("data.epochs needs data.samples_per_step (steps = epochs x samples / samples_per_step)")
        else:
            try:
                recipe = _recipe(cfg)
            except RecipeError:
                return problems  # reported by the recipe check
            if recipe.unit != "samples":
                problems.append(
                    f"data.epochs needs sample counts: recipe {recipe.name!r} gives weights; give each source"
                    " `samples: N`, or set trainer.max_steps instead"
                )
    return problems


def derive_max_steps(cfg) -> None:
    """With data.epochs, set trainer.max_steps to the steps that pass over the recipe's samples that often."""
    epochs, per_step = cfg.data.get("epochs"), cfg.data.get("samples_per_step")
    if epochs is None:
        return
    recipe = _recipe(cfg)
    samples = sum(int(s.weight) for s in recipe.sources)
    steps = max(1, math.ceil(epochs * samples / per_step))
    log.info(
        "trainer.max_steps = ceil(%s epoch(s) x %d samples (recipe %s) / %d samples per step) = %d",
        epochs, samples, recipe.name, per_step, steps,
    )
    cfg.trainer.max_steps = steps
