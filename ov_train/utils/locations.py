"""What a data location string is: a local path, a URL (`https://`, `s3://`...) or a `pipe:` shell command.

One reading for every layer: the recipe checks (is a source path relative to data.root? is it a command?) and
the readers (data/remote.py) decide with these same functions.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlsplit

PIPE = "pipe:"


def scheme(location: str) -> str:
    """`pipe` for a `pipe:` command, a URL's scheme, or "" for a local path."""
    location = str(location)
    if location.startswith(PIPE):
        return "pipe"
    return urlsplit(location).scheme if "://" in location else ""


def is_pipe(location: str) -> bool:
    return scheme(location) == "pipe"


def is_remote(location: str) -> bool:
    """Read through fsspec or a pipe, rather than from a local path."""
    return scheme(location) not in ("", "file")


def is_relative(path: str) -> bool:
    """A path that data.root is joined onto: neither a URL (file:// included), a command nor an absolute path."""
    return not (scheme(path) or Path(path).is_absolute())


def join(root: str | None, path: str) -> str:
    """`path` under `root` unless it is absolute or a URL itself. Under a `pipe:` root the path is appended as
    one shell-quoted word: a recipe file's text stays a name, never part of the command."""
    if not is_relative(path) or not root:
        return path
    root = str(root)
    if is_pipe(root):
        return root.rstrip("/") + "/" + shlex.quote(path)
    if is_remote(root):
        return root.rstrip("/") + "/" + path
    return str(Path(root) / path)
