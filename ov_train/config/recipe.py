"""Data recipe files: named sources, each with a modality/category label and a mixing share, and batching settings.

A recipe YAML holds `sources` and optional batching settings:

    max_tokens_per_batch: 32768     # optional; data.max_tokens_per_batch overrides it
    sources:
      - {name: general, path: si/general, modality: single_image, category: general, weight: 36.1}
      - {path: /abs/shards/part-*.tar, modality: text, samples: 140000}
      - {name: clips, path: video/clips, modality: video, samples: 9000, video: {fps: 2, max_frames: 16}}

`path` is a directory holding train-*.tar (and val-*.tar for held-out samples), a glob (it has * ? or [) or
a brace pattern (`shards-{000000..000099}.tar`) of train shards, or a `pipe:` command (brace patterns expand
to one command per shard); locally, at an `https://` URL, or at `s3://`, `gs://`, `hf://` through fsspec.
Relative paths resolve against `data.root` (a folder or a URL), which only a recipe with some relative path
needs. `val` names held-out shards the same way. A `pipe:` command in a recipe file (path, val or index) is
refused unless the user opts in (data.allow_pipe=true; ov-eval --allow-pipe): a recipe received from
someone else must not run commands.
`format: parquet` reads parquet files in the released OneVision layout (a directory's `*.parquet`) without
conversion; `index` names an `ov-data index` file for them; `metric` says how ov-eval scores the source.
Each source gives `weight` or `samples` (samples drawn per epoch-equivalent), and one recipe uses one of the
two throughout: a source is drawn with probability weight / sum(weights), or samples / sum(samples), so sample
counts are weights in proportion. Weights are finite positive numbers with a finite sum. A source's optional
`video` mapping (fps, max_frames, sampling, frame_size, pool, newline) overrides the stage's video settings for its samples
(config/media.py). Every problem is reported at once, naming the recipe, source and key.

This module reads the file only; it is part of the run plan, so it touches no shard (ov_train/data/recipe.py
finds them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ov_train.config.media import MediaSettingError, VideoSettings
from ov_train.constants import FORMATS, MODALITIES, PARQUET, WEBDATASET
from ov_train.resources import RECIPE_DIR
from ov_train.utils.locations import is_pipe, is_relative
from ov_train.utils.redact import redact, redact_text

SOURCE_KEYS = {"name", "path", "val", "format", "index", "modality", "category", "weight", "samples", "metric", "video"}
RECIPE_KEYS = {"sources", "max_tokens_per_batch"}


class RecipeError(ValueError):
    """A recipe that cannot be used; `problems` lists every reason, one line each."""

    def __init__(self, problems: str | list[str]):
        single = isinstance(problems, str)
        self.problems = [problems] if single else list(problems)
        super().__init__(problems if single else "invalid data recipe:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class SourceSpec:
    """One source as the recipe states it; `where` names it in messages (`mix.yaml: sources[2]`)."""

    name: str
    path: str | None
    modality: str | None
    weight: float | None  # the weight, or the sample count
    category: str | None
    where: str
    val: str | None = None  # held-out shards, named like `path`
    format: str = WEBDATASET
    index: str | None = None  # an `ov-data index` file (parquet sources)
    metric: str | None = None  # how ov-eval scores this source's answers (ov_train/eval/metrics.py)
    video: tuple[tuple[str, object], ...] = ()  # this source's own video settings, (field, value) pairs


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    file: Path
    sources: tuple[SourceSpec, ...]
    max_tokens_per_batch: int | None = None
    unit: str = "weight"  # what the sources' numbers are: `weight`s, or `samples` counts (one epoch's worth)

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
    """A .yaml path as given, or a shipped recipe's file by name."""
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
    video = src.get("video")
    if video is not None and not isinstance(video, dict):
        problems.append(f"{where}: video={video!r} must be a mapping of fps, max_frames, sampling, frame_size, pool, newline")
    elif video:
        try:
            VideoSettings.from_values(video, f"{where}: video")
        except MediaSettingError as err:
            problems += str(err).splitlines()
    return problems + _weighting_problems(where, src)


def read_recipe(name_or_path: str) -> tuple[RecipeSpec, list[str]]:
    """The recipe and its problems (every one, naming the recipe and key); RecipeError when there is no recipe
    to speak of (no file, no sources list)."""
    path = recipe_path(name_or_path)
    if not path.exists():
        raise RecipeError(f"data.recipe={str(path)!r}: file not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:  # the parser's own text says where, but of "<unicode string>": name the file
        raise RecipeError(f"data.recipe={str(path)!r}: not valid YAML: {' '.join(str(err).split())}") from None
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
        given = [k for k in ("weight", "samples") if src.get(k) is not None]
        if len(given) == 1:
            kinds.add(given[0])
        share = src.get(given[0]) if given else None
        path_value = str(src["path"]) if src.get("path") else None
        val = str(src["val"]) if src.get("val") is not None else None
        video = tuple(src["video"].items()) if isinstance(src.get("video"), dict) else ()
        sources.append(SourceSpec(name, path_value, src.get("modality"), share, src.get("category"), where, val,
                                  src.get("format", WEBDATASET), src.get("index"), src.get("metric"), video))
    unit = next(iter(kinds)) if len(kinds) == 1 else "weight"
    if len(kinds) > 1:
        problems.append(f"{path.name}: mixes weight and samples across sources; use one of them for every source")
    elif not problems and sum(float(s.weight) for s in sources) == math.inf:
        problems.append(f"{path.name}: the {unit}s sum to infinity; scale them down (only their ratios matter)")
    return RecipeSpec(path.stem, path, tuple(sources), budget, unit), problems


def _locations(spec: RecipeSpec):
    """(source, key, value) of every location a recipe file names: each source's path, val and index."""
    for s in spec.sources:
        for key in ("path", "val", "index"):
            value = getattr(s, key)
            if value:
                yield s, key, str(value)


def pipe_problems(spec: RecipeSpec, opt_in: str = "data.allow_pipe=true") -> list[str]:
    """The recipe file's `pipe:` commands, each a problem naming the file, source and key: a command runs only when
    the user opted in (`opt_in`), never because a file says so."""
    return [f"{s.where} ({s.name}): {key}={redact_text(value)!r} is a shell command (pipe:); commands in a recipe"
            f" file run only with {opt_in}" for s, key, value in _locations(spec) if is_pipe(value)]


def root_problems(spec: RecipeSpec, root: str | None, key: str = "data.root") -> list[str]:
    """`key` (the root relative source paths start from) is needed when, and only when, some path or val is
    relative; the problem names the first such source."""
    if root:
        return []
    for s, field, value in _locations(spec):
        if field != "index" and is_relative(value):
            return [f"{key} is required: {s.where} ({s.name}) has the relative {field}={redact(value)!r}; set {key}="
                    "DIR or URL (where relative source paths start), or make every source path absolute or a URL"]
    return []
