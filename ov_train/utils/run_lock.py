"""One run per run directory: a run holds a lock on it for its lifetime, and a second run there is refused.

The lock is filelock's FileLock, an flock(2) on the lock file: the kernel releases it whenever its holder ends,
however (an exception, a signal, SIGKILL, an out-of-memory kill), so no lock outlives its run on a local
filesystem. On NFS the server's lock manager holds it for the client: released when the process ends, or, when
the whole node is lost, once the client's lease expires (NFSv4: about 90 s). Where the filesystem has no flock
(ENOSYS), filelock falls back to a marker file recording pid, host and process start time, and takes over a marker
whose holder is dead on this host; a holder on another host it cannot probe, so that one is refused, named.
Beside the lock, the holder writes who it is (pid, host, start time, command) for a refused run to name, and
deletes it on release: one left behind is the record of a run that ended without releasing (killed), said so
when the next run takes over.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ov_train.utils.logging import get_logger
from ov_train.utils.paths import write_atomic
from ov_train.utils.redact import redact_text

log = get_logger(__name__)


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory."""


def _holder_of(record: Path) -> dict | None:
    try:
        holder = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "a run that has not recorded itself yet"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}:"
            f" {holder.get('command')}")


@contextmanager
def hold_run_dir(lock_path: Path):
    """Hold `lock_path` (in the run directory) while the block runs; RunDirBusy at once if another run holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    record = lock_path.with_name(lock_path.name + ".json")
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirBusy(
            f"{lock_path.parent} is in use by another run ({_describe(_holder_of(record))}); two runs in one run"
            f" directory overwrite each other's checkpoints: wait for it to end, or give this one another"
            f" hydra.run.dir"
        ) from None
    try:
        left = _holder_of(record)
        if left is not None:
            log.warning("%s: taking over the run directory from %s, which ended without releasing it (killed?)",
                        lock_path.parent, _describe(left))
        write_atomic(record, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": redact_text(" ".join(sys.argv)),
        }))
        yield
    finally:
        record.unlink(missing_ok=True)
        lock.release()
