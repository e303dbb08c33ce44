"""A recipe's sources located on disk: each source's train and held-out shards under `data.root`.

The recipe file itself (sources, labels, weights, budget) is read by ov_train.config.recipe, as part of the
run plan; here a directory source becomes its `train-*.tar` and `val-*.tar`, and a glob its matches.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from ov_train.config.recipe import RecipeError, RecipeSpec, read_recipe


@dataclass(frozen=True)
class Source:
    name: str
    modality: str | None
    weight: float
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]
    category: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A mixture with its shards: its sources (iterating a recipe walks them) and its batching settings."""

    spec: RecipeSpec
    sources: tuple[Source, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_tokens_per_batch(self) -> int | None:
        return self.spec.max_tokens_per_batch

    def shares(self, label: str) -> dict[str, float]:
        return self.spec.shares(label)

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def _glob(pattern: Path) -> tuple[str, ...]:
    return tuple(sorted(glob.glob(str(pattern))))


def _shards(path: str, root: str | Path) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Train shards, held-out shards, and what to say when there are no train shards."""
    full = Path(path) if Path(path).is_absolute() else Path(root) / path
    if any(c in path for c in "*?["):
        return _glob(full), (), f"no shards match {full}"
    return _glob(full / "train-*.tar"), _glob(full / "val-*.tar"), f"no train-*.tar shards under {full}"


def locate(spec: RecipeSpec, root: str | Path, require_shards: bool = True) -> tuple[Recipe, list[str]]:
    """The recipe with each source's shards under `root`, and the sources without train shards (when required)."""
    sources, problems = [], []
    for s in spec.sources:
        train, val, missing = _shards(s.path, root) if s.path else ((), (), "")
        if require_shards and missing and not train:
            problems.append(f"{s.where} ({s.name}): {missing}")
        sources.append(Source(s.name, s.modality, s.weight, train, val, s.category))
    return Recipe(spec, tuple(sources)), problems


def load_recipe(name_or_path: str, root: str | Path, require_shards: bool = True) -> Recipe:
    """Read and locate a recipe; every problem of the file and its shards is reported at once."""
    spec, problems = read_recipe(name_or_path)
    recipe, missing = locate(spec, root, require_shards)
    if problems or missing:
        raise RecipeError(problems + missing)
    return recipe
