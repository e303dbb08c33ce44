"""Locations safe to show: URLs without user:password@ or a ?query (presigned tokens), in names, logs, errors and
files (data/remote.py installs a log record factory that applies it to every record)."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

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


