"""Loader worker processes: they outlive a SIGTERM to the whole process group while the main process runs (it
saves at the step boundary, then shuts them down), and never keep it from exiting.

Torch stops a loader's workers when its iterator is dropped; one still referenced at exit (an error raised from a
worker holds it in its traceback) it leaves to multiprocessing, which stops daemonic children with SIGTERM and
waits for them. A worker ignoring every SIGTERM kept that wait going for ever, so a worker obeys SIGTERM once its
main process is exiting (main_exiting), and stop_loader_workers bounds the stop as ov-train ends.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from functools import cache, partial

from ov_train.utils.logging import get_logger

log = get_logger(__name__)


@cache
def main_exiting():
    """A flag in shared memory that this process's loader workers read, set when it exits.

    Registered after multiprocessing's exit handler (torch imports multiprocessing first), so atexit runs it
    before that handler stops the workers with SIGTERM."""
    flag = multiprocessing.RawValue(ctypes.c_bool, False)
    atexit.register(setattr, flag, "value", True)
    return flag


def _sigterm_in_worker(exiting, signum, frame) -> None:
    if exiting.value:  # the main process is stopping its workers: exit plainly (torch reports a death by signal)
        os._exit(0)


def init_worker(worker_id: int, rank: int, seed: bool, exiting) -> None:
    """A loader worker ignores SIGINT, and SIGTERM while its main process runs: a scheduler signals the whole
    process group (as Ctrl-C does the terminal's), and a worker that died of it would crash the main process
    ("DataLoader worker killed by signal") before it saves at the step boundary. Once `exiting` (main_exiting)
    is set, SIGTERM ends it. `seed`: Lightning's own worker seeding, which a loader with a worker_init_fn does
    not get otherwise."""
    signal.signal(signal.SIGTERM, partial(_sigterm_in_worker, exiting))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if seed:
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank)


def stop_loader_workers(grace_s: float = 5.0) -> None:
    """Stop this process's loader workers (its daemonic multiprocessing children), as it ends: SIGTERM, which they
    obey while main_exiting is set, then SIGKILL for any still busy after `grace_s` (a worker inside a long C call
    runs no signal handler until it returns). A no-op when none is left."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    exiting = main_exiting()
    exiting.value = True
    # Torch's SIGCHLD handler makes a worker ended by a signal an error in this process: moot while stopping them.
    main = threading.current_thread() is threading.main_thread()
    sigchld = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for worker in workers:
            worker.terminate()
        deadline = time.monotonic() + grace_s
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("loader worker %d still busy %.0f s after SIGTERM: killed", worker.pid, grace_s)
                worker.kill()
                worker.join()
    finally:
        exiting.value = False  # a next job in this process (a Hydra multirun) keeps its workers through a group SIGTERM
        if sigchld is not None:
            signal.signal(signal.SIGCHLD, sigchld)
