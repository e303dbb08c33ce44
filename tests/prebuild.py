"""DeepSpeed on the CPU needs C++ ops it compiles on first use: its shared-memory collectives (every engine run) and,
under ZeRO-Offload, its CPU Adam. Each build takes a CPU-minute or two, paid in every CI run (a clean clone, empty
caches). When the session will run tests marked `deepspeed_ops(...)`, the ops they name start building at collection,
each in a background process at the lowest priority, so the builds take the CPU the suite leaves idle (a rank waiting
for another, collection itself) instead of adding their time to the suite's.

When a test that needs an op starts while its build still runs, that build stops (SIGTERM: ninja removes what its
interrupted compilers were writing) and the test's run builds what is left at its own priority: on a machine shared
with other work a lowest-priority build could otherwise starve while the test waits. Torch's JIT build holds an OS
lock on each build directory and ninja keeps the objects already compiled, so nothing is built twice and nothing is
left held."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from tests.conftest import REPO

# Shared-memory collectives (deepspeed.comm, every engine on the CPU); CPU Adam (ZeRO-Offload's optimizer).
SHM, CPU_ADAM = "ShareMemCommBuilder", "CPUAdamBuilder"

_BUILD = """
import sys
from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder(sys.argv[1]).load(verbose=False)
"""
_builds: dict[str, subprocess.Popen] = {}


def _ops(item) -> list[str]:
    return [name for mark in item.iter_markers("deepspeed_ops") for name in mark.args]


def start_deepspeed_builds(items) -> None:
    """Start building every op the `deepspeed_ops` markers of the test `items` name (none when none is marked).
    A build that fails says nothing here: the run that needs the op builds it, and reports why not, itself."""
    for name in dict.fromkeys(name for item in items for name in _ops(item)):
        if name not in _builds:
            _builds[name] = subprocess.Popen(
                [sys.executable, "-c", _BUILD, name], cwd=REPO, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=lambda: os.nice(19),
            )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()


def take_over_builds(item) -> None:
    """Before `item` runs: stop the background builds of the ops it needs that are still running."""
    for name in _ops(item):
        if name in _builds:
            _stop(_builds[name])


def stop_deepspeed_builds() -> None:
    """End the builds still running when the session ends, their compilers too."""
    for proc in _builds.values():
        _stop(proc)
