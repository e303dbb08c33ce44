"""DeepSpeed on the CPU needs C++ ops it compiles on first use: its shared-memory collectives (every engine run) and,
under ZeRO-Offload, its CPU Adam. Each build takes a CPU-minute or two, paid in every CI run (a clean clone, empty
caches). When the session will run a test marked `deepspeed_ops(...)`, the builds of the ops it names start at
collection, in one background process at the lowest priority, so they take the CPU the suite leaves idle (a rank
waiting for another, collection itself) instead of adding their time to the suite's. The runs then load the ops as
before: torch's JIT build holds an OS lock on each build directory, so a run waits for this build to end (or builds
itself, if this one failed or was killed), and a later load finds the op built."""
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
for name in sys.argv[1:]:
    try:
        get_accelerator().create_op_builder(name).load(verbose=False)
    except Exception:  # the run that needs it builds it (and reports why not) itself
        pass
"""
_started: list[subprocess.Popen] = []


def start_deepspeed_builds(items) -> None:
    """Start building the ops the `deepspeed_ops` markers of the test `items` name, in the order the tests need
    them (nothing to do when no selected test is marked)."""
    names: list[str] = []
    for item in items:
        for mark in item.iter_markers("deepspeed_ops"):
            names += [n for n in mark.args if n not in names]
    if _started or not names:
        return
    _started.append(subprocess.Popen(
        [sys.executable, "-c", _BUILD, *names], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=lambda: os.nice(19),
    ))


def stop_deepspeed_builds() -> None:
    """End a build still running when the session ends, its compilers too (the locks being the kernel's, nothing is
    left held; a half-built op is rebuilt by the next load)."""
    for proc in _started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
