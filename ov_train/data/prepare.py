"""Before training: the data plan's shards located (the user's, listed once) or generated (synthetic data)."""
from __future__ import annotations

from ov_train.config.run_plan import DataPlan
from ov_train.data.recipe import Recipe, locate
from ov_train.data.synthetic import ensure_synthetic, occupied, synthetic_root
from ov_train.utils.redact import redact


def locate_shards(plan: DataPlan) -> tuple[Recipe | None, list[str]]:
    """The user's recipe with its shards (None for synthetic data, generated later), and what stops the data from
    being used, found without generating or reading a sample: missing shards, a synthetic data.root taken."""
    settings = plan.synthetic
    if settings is not None:
        occupant = occupied(synthetic_root(plan.config.root, **settings), **settings) if plan.config.root else None
        if occupant:
            return None, [f"data.root={plan.config.root!r}: {occupant}; choose another, or data.root=null for a cache"
                          " directory per setting"]
        return None, []
    recipe, missing = locate(plan.recipe, plan.config.root, require_shards=True, io=plan.config.io)
    where = f"data.recipe={plan.recipe.name}" + (f" (data.root={redact(str(plan.config.root))})" if plan.config.root else "")
    return recipe, [f"{where}: {p}" for p in missing]


def prepare_root(plan: DataPlan) -> str:
    """The directory the recipe's sources are relative to: data.root, or the synthetic data of the plan's setting,
    found or generated (once per setting: concurrent ranks and runs queue on a file lock)."""
    settings = plan.synthetic
    if settings is None:
        return plan.config.root
    return str(ensure_synthetic(synthetic_root(plan.config.root, **settings), **settings))


def prepare_data(plan: DataPlan, located: Recipe | None = None) -> Recipe:
    """The recipe with its shards: `located` (by locate_shards) as it is, else located now under prepare_root."""
    return located if located is not None else locate(plan.recipe, prepare_root(plan), False, plan.config.io)[0]
