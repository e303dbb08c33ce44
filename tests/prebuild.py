"""DeepSpeed's CPU Adam (the optimizer ZeRO-Offload steps) is C++ that DeepSpeed compiles on first use: about two
CPU-minutes, paid in every CI run (a clean clone, empty caches). When the session will run a test that needs it, the
build starts at collection, in a background process at the lowest priority, so it takes the CPU the suite leaves idle
(a rank waiting for another, a server test waiting on a socket) instead of adding its time to the suite's. The test
then loads the op as before: torch's JIT build holds an OS lock on the build directory, so it waits for this build to
end (or builds itself, if this one failed or was killed), and a later load finds it built."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from tests.conftest import REPO

_BUILD = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)"
_started: list[subprocess.Popen] = []


def start_cpu_adam_build(items) -> None:
    """Start the background build if one of the test `items` is marked `cpu_adam` (nothing to do otherwise)."""
    if _started or not any(item.get_closest_marker("cpu_adam") for item in items):
        return
    _started.append(subprocess.Popen(
        [sys.executable, "-c", _BUILD], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=lambda: os.nice(19),
    ))


def stop_cpu_adam_build() -> None:
    """End a build still running when the session ends (its compiler processes too): nothing is left half-held, the
    lock being the kernel's."""
    for proc in _started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
