"""Data recipes: named sources of WebDataset shards, each with a modality/category label and a mixing share.

A recipe YAML holds `sources` and optional batching settings:

    max_tokens_per_batch: 32768     # optional; data.max_tokens_per_batch overrides it
    sources:
      - {name: general, path: si/general, modality: single_image, category: general, weight: 36.1}
      - {path: /abs/shards/part-*.tar, modality: text, samples: 140000}

`path` is a directory holding train-*.tar (and val-*.tar for held-out samples), or a glob (it has
* ? or [) of train shards, with no held-out split; relative paths resolve against `data.root`. Each source gives `weight` or
`samples` (samples drawn per epoch-equivalent), and one recipe uses one of the two throughout: a
source is drawn with probability weight / sum(weights), or samples / sum(samples), so sample counts
are weights in proportion. Every problem is reported at once, naming the recipe, source and key.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPE_DIR = Path(__file__).resolve().parents[2] / "data_recipes"
MODALITIES = ("single_image", "multi_image", "video", "text")
SOURCE_KEYS = {"name", "path", "modality", "category", "weight", "samples", "metric"}
RECIPE_KEYS = {"sources", "max_tokens_per_batch"}


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    name: str
    modality: str | None
    weight: float
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]
    category: str | None = None
    metric: str | None = None  # how ov-eval scores this source's answers (ov_train/eval/metrics.py)


@dataclass(frozen=True)
class Recipe:
    """A mixture: its sources (iterating a recipe walks them) and its batching settings."""

    name: str
    sources: tuple[Source, ...]
    max_tokens_per_batch: int | None = None

    def __iter__(self):
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def shares(self, label: str) -> dict[str, float]:
        """Recipe fraction per `label` ('name', 'modality' or 'category'); unlabelled sources are left out."""
        total = sum(s.weight for s in self.sources)
        out: dict[str, float] = {}
        for s in self.sources:
            key = getattr(s, label)
            if key is not None:
                out[key] = out.get(key, 0.0) + s.weight / total
        return out


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
        raise RecipeError(f"data.recipe={name_or_path!r}: no such recipe; known recipes: {known}")
    return path


def _is_number(value, integer: bool = False) -> bool:
    kinds = int if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value > 0


def _glob(pattern: Path) -> tuple[str, ...]:
    return tuple(sorted(glob.glob(str(pattern))))


def _resolve(path: str, root: str | Path) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """Train shards, held-out shards, and what to say when there are no train shards."""
    full = Path(path) if Path(path).is_absolute() else Path(root) / path
    if any(c in path for c in "*?["):
        return _glob(full), (), f"no shards match {full}"
    return _glob(full / "train-*.tar"), _glob(full / "val-*.tar"), f"no train-*.tar shards under {full}"


def _weighting_problems(where: str, src: dict) -> list[str]:
    weight, samples = src.get("weight"), src.get("samples")
    if weight is not None and samples is not None:
        return [f"{where}: gives both weight={weight!r} and samples={samples!r}; give one"]
    if weight is None and samples is None:
        return [f"{where}: needs a weight or a sample count (samples: N)"]
    if weight is not None and not _is_number(weight):
        return [f"{where}: weight={weight!r} must be a positive number"]
    if samples is not None and not _is_number(samples, integer=True):
        return [f"{where}: samples={samples!r} must be a positive integer"]
    return []


def _source_problems(where: str, src: dict) -> list[str]:
    problems = []
    unknown = sorted(set(src) - SOURCE_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}")
    if not src.get("path"):
        problems.append(f"{where}: needs a path (a shard directory or glob)")
    modality, category = src.get("modality"), src.get("category")
    if modality is None and category is None:
        problems.append(f"{where}: needs a modality {list(MODALITIES)} and/or a category label")
    if modality is not None and modality not in MODALITIES:
        problems.append(f"{where}: modality={modality!r}; allowed: {list(MODALITIES)}")
    if category is not None and not (isinstance(category, str) and category):
        problems.append(f"{where}: category={category!r} must be a non-empty string")
    return problems + _weighting_problems(where, src)


def load_recipe(name_or_path: str, root: str | Path, require_shards: bool = True) -> Recipe:
    """Parse and check a recipe; every problem is reported at once, naming the recipe and key."""
    path = recipe_path(name_or_path)
    if not path.exists():
        raise RecipeError(f"data.recipe={str(path)!r}: file not found")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise RecipeError(f"{path}: needs a non-empty 'sources' list")
    problems = []
    unknown = sorted(set(spec) - RECIPE_KEYS)
    if unknown:
        problems.append(f"{path.name}: unknown key(s) {unknown}; allowed: {sorted(RECIPE_KEYS)}")
    budget = spec.get("max_tokens_per_batch")
    if budget is not None and not _is_number(budget, integer=True):
        problems.append(f"{path.name}: max_tokens_per_batch={budget!r} must be a positive integer or null")
    sources, names, kinds = [], set(), set()
    for i, src in enumerate(spec["sources"]):
        where = f"{path.name}: sources[{i}]"
        if not isinstance(src, dict):
            problems.append(f"{where}: must be a mapping with path, modality/category and weight/samples")
            continue
        problems += _source_problems(where, src)
        name = str(src.get("name", src.get("path")))
        if name in names:
            problems.append(f"{where}: name {name!r} is used twice; names key the stream state")
        names.add(name)
        train, val, missing = _resolve(str(src["path"]), root) if src.get("path") else ((), (), "")
        if require_shards and missing and not train:
            problems.append(f"{where} ({name}): {missing}")
        given = [k for k in ("weight", "samples") if src.get(k) is not None]
        if len(given) == 1:
            kinds.add(given[0])
        share = src.get(given[0]) if given else None
        sources.append(Source(name, src.get("modality"), share, train, val, src.get("category"), src.get("metric")))
    if len(kinds) > 1:
        problems.append(f"{path.name}: mixes weight and samples across sources; use one of them for every source")
    if problems:
        raise RecipeError("invalid data recipe:\n  " + "\n  ".join(problems))
    return Recipe(path.stem, tuple(sources), budget)
