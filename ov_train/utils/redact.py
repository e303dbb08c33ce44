"""Locations safe to show: URLs without user:password@ or a ?query (presigned tokens), in names, logs, errors and
files (data/remote.py installs a log record factory that applies it to every record)."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ov_train.utils.paths import write_atomic

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_QUERY = re.compile(r"(://[^\s'\"?#]*)\?[^\s'\"#]*")


def redact(location: str) -> str:
    """A location without user:password@ or a ?query (presigned tokens): what logs and files may hold."""
    location = str(location)
    if "://" not in location:
        return location
    parts = urlsplit(location)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Any URL inside a message (an exception's text) with its userinfo and query removed."""
    return _QUERY.sub(r"\1", _USERINFO.sub("", str(text)))


def redact_tree(value):
    """A config tree (dicts, lists, strings) with every URL inside it redacted: what dashboards may be given."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return redact_text(value) if isinstance(value, str) else value


def redact_files(paths) -> None:
    """Rewrite text files that name a URL with credentials (Hydra's .hydra/*.yaml and multirun.yaml keep the
    command line as typed), replacing each file in one rename so a reader never sees half of it."""
    for path in map(Path, paths):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        clean = redact_text(text)
        if clean != text:
            write_atomic(path, clean)
