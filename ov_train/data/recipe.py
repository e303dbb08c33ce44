"""A recipe's sources located: each source's train and held-out shards under `data.root`, wherever they live.

The recipe file itself (sources, labels, weights, budget) is read by ov_train.config.recipe, as part of the
run plan; here a directory source becomes its `train-*.tar` and `val-*.tar` (a parquet source its
`*.parquet`), a glob its matches, a brace pattern its names, locally or through fsspec (data/remote.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from ov_train.config.options import IOSettings
from ov_train.config.recipe import RecipeError, RecipeSpec, SourceSpec, pipe_problems, read_recipe, root_problems
from ov_train.constants import FORMATS, PARQUET, WEBDATASET
from ov_train.data import remote
from ov_train.utils.locations import is_relative
from ov_train.utils.redact import redact, redact_text

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")  # a path ending so names one shard, not a folder


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


def _in_folder(folder: str, pattern: str, io: IOSettings, listed: dict[str, list[str]]) -> list[str]:
    """The files of `folder` whose names match `pattern`, from one listing of the folder however many patterns
    ask (a folder's train and held-out shards: one request to an object store, not one per split)."""
    folder = folder.rstrip("/")
    if folder not in listed:
        listed[folder] = remote.glob(folder + "/*", io)
    return [f for f in listed[folder] if fnmatch(f.rsplit("/", 1)[-1], pattern)]


def locations(path: str, root: str | Path, fmt: str = WEBDATASET, split: str = "train",
              io: IOSettings = IOSettings(), check: bool = True,
              listed: dict[str, list[str]] | None = None) -> tuple[list[str], str]:
    """The shards a recipe path names, and the problem with them ("" when there is none): a directory's
    `train-*.tar` (`val-*.tar` for split="val"; `*.parquet` for parquet), a glob's matches, a brace pattern's
    or a file's names (`check`: all must exist), a `pipe:` command. Listing errors (an unreachable server) propagate.
    `listed` keeps the folders listed so far (_in_folder), for the next call."""
    full = remote.join(root, path)
    shown = redact(full)
    if remote.is_pipe(full):
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
            matches = _in_folder(name, pattern, io, {} if listed is None else listed)
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


def _shards(src: SourceSpec, root, io: IOSettings, check: bool) -> tuple[tuple, tuple, list[str]]:
    """Train shards, held-out shards, and the problems of finding them."""
    path, listed = src.path, {}
    try:
        train, problem = locations(path, root, src.format, "train", io, check, listed)
        problems = [problem] if problem else []
        held: list[str] = []
        if src.val is not None:
            held, problem = locations(src.val, root, src.format, "val", io, check, listed)
            problems += [f"val: {problem}"] if problem else []
        elif src.format == WEBDATASET and not (remote.has_glob(path) or "{" in path
                                               or remote.is_pipe(remote.join(root, path))
                                               or path.endswith(SHARD_SUFFIXES)):
            held, _ = locations(path, root, src.format, "val", io, check, listed)  # a folder's val-*.tar, if any
    except Exception as err:  # an unreachable server, missing credentials, an unknown protocol...
        where = redact(remote.join(root, path))
        return (), (), [f"cannot list {where}: {type(err).__name__}: {redact_text(err)}"]
    return tuple(train), tuple(held), problems


def _root_problem(root: str | Path, io: IOSettings) -> str | None:
    """Why no shard can be under `root` at all, or None; asked once every relative source failed, never otherwise."""
    try:
        found = remote.glob(str(root).rstrip("/") + "/*", io) if remote.is_remote(str(root)) else Path(root).is_dir()
    except Exception as err:  # as in _shards
        return f"cannot list {redact(str(root))}: {type(err).__name__}: {redact_text(err)}"
    return None if found else f"{redact(str(root))}: no such directory, or nothing in it"


def locate(spec: RecipeSpec, root: str | Path, require_shards: bool = True,
           io: IOSettings = IOSettings()) -> tuple[Recipe, list[str]]:
    """The recipe with each source's shards under `root`, and the sources whose shards are missing (when required):
    one problem for a root under which every relative source failed because the root itself is unusable."""
    sources, problems = [], {}
    for i, s in enumerate(spec.sources):
        train, val = (), ()
        if s.path and s.format in FORMATS:
            train, val, missing = _shards(s, root, io, check=require_shards)
            if require_shards and missing:
                problems[i] = [f"{s.where} ({s.name}): {m}" for m in missing]
        sources.append(Source(s.name, s.modality, s.weight, train, val, s.category, s.format, s.index, metric=s.metric))
    rooted = [i for i, s in enumerate(spec.sources) if s.path and s.format in FORMATS and is_relative(s.path)]
    unusable = root and len(rooted) > 1 and all(i in problems for i in rooted) and not remote.is_pipe(str(root))
    if unusable and (reason := _root_problem(root, io)):
        problems = {-1: [f"no source's shards: {reason}"], **{i: p for i, p in problems.items() if i not in rooted}}
    return Recipe(spec, tuple(sources)), [p for found in problems.values() for p in found]


def load_recipe(name_or_path: str, root: str | Path | None, require_shards: bool = True,
                io: IOSettings = IOSettings(), allow_pipe: bool = False, root_key: str = "data.root",
                pipe_key: str = "data.allow_pipe=true") -> Recipe:
    """Read and locate a recipe; every problem of the file and its shards is reported at once: among them the
    file's `pipe:` commands (unless `allow_pipe`; locating runs none) and relative paths without a root. `root_key`
    and `pipe_key` say how the caller's user gives a root and opts in (ov-eval: --root, --allow-pipe)."""
    spec, problems = read_recipe(name_or_path)
    unrooted = root_problems(spec, root, root_key)
    problems += ([] if allow_pipe else pipe_problems(spec, pipe_key)) + unrooted
    recipe, missing = locate(spec, root, require_shards, io) if not unrooted else (None, [])
    if problems or missing:
        raise RecipeError(problems + missing)
    return recipe
