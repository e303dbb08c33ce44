"""Data recipes: named sources of WebDataset shards, each with a modality/category label and a mixing share.

A recipe YAML holds `sources` and optional batching settings:

    max_tokens_per_batch: 32768     # optional; data.max_tokens_per_batch overrides it
    sources:
      - {name: general, path: si/general, modality: single_image, category: general, weight: 36.1}
      - {path: /abs/shards/part-*.tar, modality: text, samples: 140000}

`path` is a directory holding train-*.tar (and val-*.tar for held-out samples), a glob (it has * ? or [) or
a brace pattern (`shards-{000000..000099}.tar`) of train shards, or a `pipe:` command (brace patterns expand
to one command per shard); locally, at an `https://` URL, or at `s3://`, `gs://`, `hf://` through fsspec.
Relative paths resolve against `data.root` (a folder or a URL). `val` names held-out shards the same way.
`format: parquet` reads parquet files in the released OneVision layout (a directory's `*.parquet`) without
conversion; `index` names an `ov-data index` file for them. Each source gives `weight` or
`samples` (samples drawn per epoch-equivalent), and one recipe uses one of the two throughout: a
source is drawn with probability weight / sum(weights), or samples / sum(samples), so sample counts
are weights in proportion. Weights are finite positive numbers with a finite sum. Every problem is
reported at once, naming the recipe, source and key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ov_train.data import remote
from ov_train.data.remote import IOSettings, redact, redact_text
from ov_train.data.sources import FORMATS, PARQUET, WEBDATASET

RECIPE_DIR = Path(__file__).resolve().parents[2] / "data_recipes"
MODALITIES = ("single_image", "multi_image", "video", "text")
SOURCE_KEYS = {"name", "path", "val", "format", "index", "modality", "category", "weight", "samples", "metric"}
RECIPE_KEYS = {"sources", "max_tokens_per_batch"}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")  # a path ending so names one shard, not a folder


class RecipeError(ValueError):
    """A recipe that cannot be used; `problems` lists every reason, one line each."""

    def __init__(self, problems: str | list[str]):
        single = isinstance(problems, str)
        self.problems = [problems] if single else list(problems)
        super().__init__(problems if single else "invalid data recipe:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Source:
    name: str
    modality: str | None
    weight: float
    train_shards: tuple[str, ...]
    val_shards: tuple[str, ...]
    category: str | None = None
    format: str = WEBDATASET
    index: str | None = None  # an `ov-data index` file named by the recipe (parquet sources)
    # Parquet sources: rows the index rejected, {redacted file location: {row: reason}}.
    rejects: dict = field(default_factory=dict, compare=False, repr=False)
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
        out: dict[str, float] = {}
        for s, share in zip(self.sources, normalised([s.weight for s in self.sources])):
            key = getattr(s, label)
            if key is not None:
                out[key] = out.get(key, 0.0) + share
        return out


def normalised(weights: list[float]) -> list[float]:
    """Weights as fractions summing to 1. Scaled by the largest first, so huge weights cannot overflow the
    sum (1e308 + 1e308) nor tiny ones underflow it; non-finite or non-positive weights are refused."""
    if not weights or not all(_is_number(w) for w in weights):
        raise ValueError(f"mixing weights must be finite positive numbers, got {weights!r}")
    top = max(float(w) for w in weights)
    scaled = [float(w) / top for w in weights]
    total = math.fsum(scaled)
    return [w / total for w in scaled]


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
    """A positive number that is finite as a float (YAML's .inf and .nan, or 10**400, are not)."""
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:
        return False


def locations(path: str, root: str | Path, fmt: str = WEBDATASET, split: str = "train",
              io: IOSettings = IOSettings(), check: bool = True) -> tuple[list[str], str]:
    """The shards a recipe path names, and the problem with them ("" when there is none): a directory's
    `train-*.tar` (`val-*.tar` for split="val"; `*.parquet` for parquet), a glob's matches, a brace pattern's
    or a file's names (`check`: all must exist), a `pipe:` command. Listing errors (an unreachable server) propagate."""
    full = remote.join(str(root) if root is not None else "", path)
    shown = redact(full)
    if full.startswith("pipe:"):
        return remote.expand(full), ""
    found, named, problems = [], [], []
    for name in remote.expand(full):
        if remote.has_glob(name):
            matches = remote.glob(name, io)
            found += matches
            problems += [] if matches else [f"no shards match {redact(name)}"]
        elif name.endswith(SHARD_SUFFIXES):
            named.append(name)
        else:
            pattern = "*.parquet" if fmt == PARQUET else f"{split}-*.tar"
            matches = remote.glob(name.rstrip("/") + "/" + pattern, io)
            found += matches
            what = "files" if fmt == PARQUET else "shards"
            problems += [] if matches else [f"no {pattern} {what} under {redact(name)}"]
    if named:
        there = set(remote.existing(named, io)) if check else set(named)
        missing = [redact(n) for n in named if n not in there]
        found += [n for n in named if n in there]
        if missing:
            problems.append(f"{len(missing)} of {len(named)} shards of {shown} do not exist (first: {missing[0]})")
    return found, "; ".join(problems)


def _resolve(src: dict, root, io: IOSettings, check: bool) -> tuple[tuple, tuple, list[str]]:
    """Train shards, held-out shards, and the problems of finding them."""
    fmt, path, val = src.get("format", WEBDATASET), str(src["path"]), src.get("val")
    try:
        train, problem = locations(path, root, fmt, "train", io, check)
        problems = [problem] if problem else []
        held: list[str] = []
        if val is not None:
            held, problem = locations(str(val), root, fmt, "val", io, check)
            problems += [f"val: {problem}"] if problem else []
        elif fmt == WEBDATASET and not (remote.has_glob(path) or "{" in path or path.startswith("pipe:")
                                        or path.endswith(SHARD_SUFFIXES)):
            held, _ = locations(path, root, fmt, "val", io, check)  # a folder's val-*.tar, when it has some
    except Exception as err:  # an unreachable server, missing credentials, an unknown protocol...
        where = redact(remote.join(str(root) if root is not None else "", path))
        return (), (), [f"cannot list {where}: {type(err).__name__}: {redact_text(err)}"]
    return tuple(train), tuple(held), problems


def _weighting_problems(where: str, src: dict) -> list[str]:
    weight, samples = src.get("weight"), src.get("samples")
    if weight is not None and samples is not None:
        return [f"{where}: gives both weight={weight!r} and samples={samples!r}; give one"]
    if weight is None and samples is None:
        return [f"{where}: needs a weight or a sample count (samples: N)"]
    if weight is not None and not _is_number(weight):
        return [f"{where}: weight={weight!r} must be a positive, finite number"]
    if samples is not None and not _is_number(samples, integer=True):
        return [f"{where}: samples={samples!r} must be a positive integer"]
    return []


def _source_problems(where: str, src: dict) -> list[str]:
    problems = []
    unknown = sorted(set(src) - SOURCE_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(SOURCE_KEYS)}")
    if not src.get("path"):
        problems.append(f"{where}: needs a path (a shard directory, glob, brace pattern, URL or pipe: command)")
    if src.get("format", WEBDATASET) not in FORMATS:
        problems.append(f"{where}: format={src.get('format')!r}; allowed: {list(FORMATS)}")
    if src.get("index") is not None and src.get("format") != PARQUET:
        problems.append(f"{where}: index= is for format: parquet sources")
    modality, category = src.get("modality"), src.get("category")
    if modality is None and category is None:
        problems.append(f"{where}: needs a modality {list(MODALITIES)} and/or a category label")
    if modality is not None and modality not in MODALITIES:
        problems.append(f"{where}: modality={modality!r}; allowed: {list(MODALITIES)}")
    if category is not None and not (isinstance(category, str) and category):
        problems.append(f"{where}: category={category!r} must be a non-empty string")
    return problems + _weighting_problems(where, src)


def load_recipe(name_or_path: str, root: str | Path, require_shards: bool = True,
                io: IOSettings = IOSettings()) -> Recipe:
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
        # A path's name is shown in logs and metrics and keys the stream state: never with credentials.
        name = str(src.get("name", redact(str(src.get("path")))))
        if name in names:
            problems.append(f"{where}: name {name!r} is used twice; names key the stream state")
        names.add(name)
        train, val = (), ()
        if src.get("path") and src.get("format", WEBDATASET) in FORMATS:
            train, val, missing = _resolve(src, root, io, check=require_shards)
            if require_shards:
                problems += [f"{where} ({name}): {m}" for m in missing]
        given = [k for k in ("weight", "samples") if src.get(k) is not None]
        if len(given) == 1:
            kinds.add(given[0])
        share = src.get(given[0]) if given else None
        sources.append(Source(name, src.get("modality"), share, train, val, src.get("category"),
                              src.get("format", WEBDATASET), src.get("index"), metric=src.get("metric")))
    if len(kinds) > 1:
        problems.append(f"{path.name}: mixes weight and samples across sources; use one of them for every source")
    elif not problems and sum(float(s.weight) for s in sources) == math.inf:
        problems.append(f"{path.name}: the {kinds.pop()}s sum to infinity; scale them down (only their ratios matter)")
    if problems:
        raise RecipeError(problems)
    return Recipe(path.stem, tuple(sources), budget)

