"""Where data lives: local paths, `https://`, `s3://`, `gs://`, `hf://` (through fsspec) and `pipe:` commands.

`open_stream` picks the opener from the location's scheme (utils/locations.py): local files directly, the
object-store and HTTP schemes through fsspec (with connect and read timeouts, instead of the `curl`
subprocesses webdataset's gopen ships, which have none), and only `pipe:` through webdataset's pipe opener,
a shell. Which `pipe:` locations may get that far is the recipe checks' decision (config/recipe.py:
pipe_problems). A server's error status is named as such (ServerError), never as a missing file.
Credentials come from each client's usual environment and config files (AWS_* variables and ~/.aws for S3,
~/.netrc or user:password in a URL for HTTP...); every location that reaches a log, an error or a file is
`redact`ed first.
"""
from __future__ import annotations

import importlib
import io as _io
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

import braceexpand
import fsspec

from ov_train.config.options import IOSettings
from ov_train.utils.locations import is_pipe, is_remote, join, scheme  # noqa: F401  (join: the readers' import)
from ov_train.utils.logging import get_logger
from ov_train.utils.redact import redact, redact_text

log = get_logger(__name__)
# The module, not the function of that name that `webdataset` exports (its pipe opener is used).
wds_gopen = importlib.import_module("webdataset.gopen")

FSSPEC_SCHEMES = ("http", "https", "s3", "s3a", "gs", "gcs", "hf")
T = TypeVar("T")


def _redacting(factory):
    """A log record factory whose records name URLs without credentials, whoever logs them (fsspec's and the
    clients' own debug lines print whole URLs)."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        args_ = record.args if isinstance(record.args, tuple) else ()
        texts = (record.msg, *(a for a in args_ if not isinstance(a, (int, float, type(None)))))
        if any("://" in str(t) for t in texts):
            message = record.getMessage()
            clean = redact_text(message)
            if clean != message:
                record.msg, record.args = clean, ()
        return record

    make.redacts = True
    return make


if not getattr(logging.getLogRecordFactory(), "redacts", False):
    logging.setLogRecordFactory(_redacting(logging.getLogRecordFactory()))


# ---------------------------------------------------------------- opening

def storage_options(protocol: str, io: IOSettings) -> dict:
    """fsspec options that bound each request by io.timeout_s; the clients' own retries are off (ours count)."""
    t = io.timeout_s
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}}
    return {}


def filesystem(location: str, io: IOSettings = IOSettings()):
    """(fsspec filesystem, path within it) of a local or remote location."""
    return fsspec.core.url_to_fs(location, **storage_options(scheme(location), io))


class ServerError(OSError):
    """A request the server answered with an error status other than 404 (a 500, a 503, a 403...): named with
    its status and the location (redacted), and retried like any failed read; a 404 stays FileNotFoundError."""


def _status(err: BaseException) -> int | None:
    """The status a server answered a failed request with, found along the error's causes: fsspec's HTTP client
    reports any failed request as FileNotFoundError raised from aiohttp's response error, which holds it
    (botocore's ClientError holds it in its response)."""
    from aiohttp import ClientResponseError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ClientResponseError):
            return seen.status
        response = getattr(seen, "response", None)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def named_errors(location: str):
    """Requests to `location` whose failure says what the server answered (ServerError), not "not found"."""
    try:
        yield
    except Exception as err:
        status = _status(err)
        if status is None or status == 404 or status < 400:
            raise
        try:
            phrase = f" {HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        # `from None`: the client's own errors spell the URL with its credentials.
        raise ServerError(f"server error: HTTP {status}{phrase} from {redact(location)}") from None


def open_stream(location: str, io: IOSettings, mode: str = "rb"):
    """Open a local path, a URL (through fsspec: a streaming file whose requests io.timeout_s bounds) or a
    `pipe:` command (webdataset's pipe opener, through a shell). The kind is decided here, by
    utils.locations.scheme: webdataset's own dispatch would also start curl, gsutil or ais for other schemes and
    take ` pipe:...` or `PIPE:...` for commands."""
    kind = scheme(location)
    if kind == "":
        return open(location, mode)
    if kind == "pipe":
        return wds_gopen.gopen_pipe(location, mode)
    if kind not in (*FSSPEC_SCHEMES, "file"):
        allowed = ", ".join(f"{s}://" for s in ("file", *FSSPEC_SCHEMES))
        raise ValueError(f"{redact(location)}: cannot read {kind}:// locations; allowed: local paths, {allowed}, pipe:")
    fs, path = filesystem(location, io)
    with named_errors(location):
        if kind in ("http", "https") and mode == "rb":
            return fs.open(path, mode, block_size=0)  # one streaming GET: servers need not support ranges
        return fs.open(path, mode)


def read_bytes(location: str, io: IOSettings = IOSettings()) -> bytes:
    return retrying(lambda: _read_all(location, io), f"read {redact(location)}", io)


def _read_all(location: str, io: IOSettings) -> bytes:
    with open_stream(location, io) as f:
        return f.read()


def retrying(call: Callable[[], T], what: str, io: IOSettings, fatal: tuple[type[Exception], ...] = ()) -> T:
    """call(), tried again io.retries times after a failure, waiting backoff_s, 2 x backoff_s, ...
    Files that do not exist (and `fatal` errors) are not retried."""
    for attempt in range(io.retries + 1):
        try:
            return call()
        except (FileNotFoundError, *fatal):
            raise
        except Exception as err:  # clients raise OSError, aiohttp and botocore errors, timeouts...
            if attempt == io.retries:
                raise
            delay = io.backoff_s * 2 ** attempt
            log.warning("%s failed (%s); attempt %d of %d in %.1f s", what, redact_text(err), attempt + 2,
                        io.retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- listing

def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand(location: str) -> list[str]:
    """A brace pattern (`shards-{000000..000099}.tar`) as its names; other locations as themselves."""
    return list(braceexpand.braceexpand(location)) if "{" in location else [location]


def glob(pattern: str, io: IOSettings = IOSettings()) -> list[str]:
    """Sorted locations matching a glob, as full URLs for remote ones; [] when none match."""
    fs, path = filesystem(pattern, io)

    def listing():
        with named_errors(pattern):
            return fs.glob(path)

    found = retrying(listing, f"list {redact(pattern)}", io)
    if not is_remote(pattern):
        return sorted(found)
    return sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in found)


def existing(locations: list[str], io: IOSettings = IOSettings()) -> list[str]:
    """Which of these locations exist (one listing per parent folder of remote ones)."""
    if all(not is_remote(x) for x in locations):
        return [x for x in locations if Path(x).exists()]
    by_parent: dict[str, list[str]] = {}
    for x in locations:
        by_parent.setdefault(x.rsplit("/", 1)[0], []).append(x)
    found = []
    for parent, names in by_parent.items():
        fs, path = filesystem(parent, io)

        def listing(fs=fs, path=path, parent=parent):
            with named_errors(parent):
                return fs.ls(path, detail=False)

        listed = {p.rstrip("/").rsplit("/", 1)[-1] for p in retrying(listing, f"list {redact(parent)}", io)}
        found += [x for x in names if x.rsplit("/", 1)[-1] in listed]
    return found


# ---------------------------------------------------------------- writing whole files

def upload(local: Path, location: str, io: IOSettings = IOSettings()) -> None:
    """Put a finished local file at a remote location in one piece: object stores show an object only once its
    upload completed, so readers never see part of it."""
    fs, path = filesystem(location, io)
    retrying(lambda: fs.put_file(str(local), path), f"upload to {redact(location)}", io)


def remote_size(location: str, io: IOSettings = IOSettings()) -> int | None:
    fs, path = filesystem(location, io)
    try:
        with named_errors(location):
            return int(fs.info(path).get("size"))
    except (FileNotFoundError, TypeError):
        return None


def parquet_file(location: str, io: IOSettings):
    """A pyarrow ParquetFile over a local or remote file (random access; a whole read from HTTP servers
    that answer no range requests)."""
    import pyarrow.parquet as pq

    if scheme(location) == "":
        return pq.ParquetFile(location)
    fs, path = filesystem(location, io)
    with named_errors(location):
        handle = fs.open(path, "rb")
    try:
        return pq.ParquetFile(handle)
    except ValueError as err:
        if "range" not in str(err).lower():
            raise
    with open_stream(location, io) as f:
        return pq.ParquetFile(_io.BytesIO(f.read()))
