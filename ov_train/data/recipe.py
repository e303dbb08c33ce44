"""Data recipes: named sources of WebDataset shards with a modality and a mixing weight."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[2] / "data_recipes"
MODALITIES = ("single_image", "multi_image", "video", "text")
SOURCE_KEYS = {"name", "path", "modality", "weight"}


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    name: str
    modality: str
    weight: float
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise RecipeError(f"data.recipe={name_or_path!r}: no such recipe; known recipes: {known}")
    return path


def _shards(directory: Path, split: str) -> tuple[str, ...]:
    return tuple(sorted(glob.glob(str(directory / f"{split}-*.tar"))))


def load_recipe(name_or_path: str, root: str | Path, require_shards: bool = True) -> list[Source]:
    """Parse and check a recipe; every problem is reported at once, naming the recipe and key."""
    path = recipe_path(name_or_path)
    if not path.exists():
        raise RecipeError(f"data.recipe={str(path)!r}: file not found")
    spec = yaml.safe_load(path.read_text()) or {}
    problems, sources = [], []
    if not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise RecipeError(f"{path}: needs a non-empty 'sources' list")
    for i, src in enumerate(spec["sources"]):
        where = f"{path.name}: sources[{i}]"
        unknown = sorted(set(src) - SOURCE_KEYS)
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}")
        if src.get("modality") not in MODALITIES:
            problems.append(f"{where}: modality={src.get('modality')!r}; allowed: {list(MODALITIES)}")
        weight = src.get("weight")
        if not isinstance(weight, (int, float)) or weight <= 0:
            problems.append(f"{where}: weight={weight!r} must be a positive number")
        directory = Path(root) / str(src.get("path", ""))
        train, val = _shards(directory, "train"), _shards(directory, "val")
        if require_shards and not train:
            problems.append(f"{where}: no train-*.tar shards under {directory}")
        sources.append(Source(str(src.get("name", src.get("path"))), src.get("modality"), weight, train, val))
    if problems:
        raise RecipeError("invalid data recipe:\n  " + "\n  ".join(problems))
    return sources
