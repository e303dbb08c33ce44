"""Loader workers outlive a group SIGTERM while their main process runs, and never keep it from exiting."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial

import pytest
from torch.utils.data import DataLoader, IterableDataset

from ov_train.training.loader_workers import init_worker, main_exiting, stop_loader_workers
from tests.conftest import REPO


class Counting(IterableDataset):
    """0, 1, 2, ...; `fail_at`: raises there; `deaf`: the worker blocks SIGTERM first (as one busy in a long C call
    runs no Python handler)."""

    def __init__(self, fail_at: int | None = None, deaf: bool = False):
        self.fail_at, self.deaf = fail_at, deaf

    def __iter__(self):
        if self.deaf:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        i = 0
        while True:
            if i == self.fail_at:
                raise ValueError(f"bad sample {i}")
            yield i
            i += 1


def loader(dataset, workers: int = 1) -> DataLoader:
    init = partial(init_worker, rank=0, seed=False, exiting=main_exiting())
    return DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=init)


def workers_alive(before: frozenset = frozenset()) -> list:
    """Daemon children started since `before` (other tests of this process may keep loaders of their own)."""
    return [p for p in multiprocessing.active_children() if p.daemon and p.pid not in before]


def pids() -> frozenset:
    return frozenset(p.pid for p in workers_alive())


def test_an_error_raised_in_a_worker_lets_the_process_exit():
    # The error's traceback holds the iterator, so torch leaves its workers to multiprocessing's exit, which stops
    # them with SIGTERM and waits: a worker ignoring it kept the interpreter waiting for ever.
    script = textwrap.dedent("""
        from functools import partial
        from torch.utils.data import DataLoader, IterableDataset
        from ov_train.training.loader_workers import init_worker, main_exiting

        class Failing(IterableDataset):
            def __iter__(self):
                yield 0
                raise ValueError("bad sample 1")

        init = partial(init_worker, rank=0, seed=False, exiting=main_exiting())
        for batch in DataLoader(Failing(), batch_size=None, num_workers=2, worker_init_fn=init):
            pass
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "ValueError: bad sample 1" in result.stderr


def test_a_worker_ignores_sigterm_while_its_main_process_runs():
    before = pids()
    batches = iter(loader(Counting()))
    assert next(batches) == 0
    (worker,) = workers_alive(before)
    os.kill(worker.pid, signal.SIGTERM)  # a scheduler's SIGTERM to the whole process group
    time.sleep(0.5)
    assert worker.is_alive() and [next(batches) for _ in range(3)] == [1, 2, 3]
    del batches
    assert not workers_alive(before)


@pytest.mark.parametrize("deaf", [False, True])
def test_stop_loader_workers_ends_them_within_its_grace(deaf):
    before = pids()
    batches = iter(loader(Counting(fail_at=2, deaf=deaf), workers=2))
    try:
        with pytest.raises(ValueError, match="bad sample 2"):
            list(batches)  # the iterator stays referenced, its workers waiting for work
        assert len(workers_alive(before)) == 2
    finally:  # deaf workers left alive would keep this process from exiting
        start = time.monotonic()
        stop_loader_workers(grace_s=1.0)
    assert not workers_alive() and time.monotonic() - start < 5
    assert not main_exiting().value  # a later job's workers ignore a group SIGTERM again
    del batches
