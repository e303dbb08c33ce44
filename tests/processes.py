"""Multi-process test runs: each command in its own session, all under one timeout; on a failure or a timeout every
session is killed (every rank, loader worker and launcher child), so a hung collective never outlives its test."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_together(commands: list[tuple[list[str], dict]], logs: list[Path], timeout: float, cwd: Path = REPO) -> None:
    """Start every (args, extra environment) at once and wait for all; assert each exits 0 within `timeout` s."""
    procs = []
    for (args, env), log in zip(commands, logs):
        with open(log, "w") as out:
            env = {**os.environ, "PYTHONPATH": str(REPO), **env}
            procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline, failure = time.monotonic() + timeout, None
    try:
        while failure is None and any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:  # the others would wait forever in their next collective
                failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                failure = f"timeout after {timeout} s (a hung collective?)"
            else:
                time.sleep(0.2)
        failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failure is None and failed:
            failure = f"process {failed[0]} exited with {procs[failed[0]].returncode}"
    finally:
        for proc in procs:
            _kill(proc)
    if failure:
        tails = "\n".join(f"--- {log}\n{log.read_text()[-6000:]}" for log in logs)
        raise AssertionError(f"{failure}: {[' '.join(c[0]) for c in commands]}\n{tails}")


def run_one(args: list[str], log: Path, timeout: float = 300, env: dict | None = None, cwd: Path = REPO) -> None:
    run_together([(args, env or {})], [log], timeout, cwd)


def exit_of(args: list[str], log: Path, timeout: float, linger: float = 20, env: dict | None = None,
            cwd: Path = REPO) -> tuple[int | None, list[str]]:
    """Run `args` in its own session: its exit status (None: still running after `timeout` s) and the command lines
    of what it started (loader workers, other ranks) still running `linger` s after it exited. Then whatever is
    left of the session is killed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        return rc, left_behind(proc.pid, linger)
    except subprocess.TimeoutExpired:
        return None, []
    finally:
        _kill(proc)


def left_behind(session: int, grace: float) -> list[str]:
    """The command lines of processes of `session` still alive (not zombies) after `grace` s."""
    import psutil

    deadline = time.monotonic() + grace
    while True:
        alive = []
        for p in psutil.process_iter(["pid", "status", "cmdline"]):
            try:
                if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.info["cmdline"] or []))
            except (ProcessLookupError, PermissionError):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def free_port(low: int = 15000, high: int = 25000) -> int:
    """A TCP port in [low, high) that nothing listens on now."""
    for port in range(low + os.getpid() % 1000, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")
