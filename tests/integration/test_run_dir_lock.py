"""Two runs in one run directory (`ckpt_path=auto` twice at once): the second is refused at once, naming the first,
which trains on; after a kill -9 of the first, the next run takes the directory over, saying so."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SMALL_DATA

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


@pytest.fixture
def start(tmp_path, small_data_root):
    """`python train.py ... ckpt_path=auto` in `tmp_path/run`, in its own session; killed with it at the end."""
    started = []
    overrides = [f"hydra.run.dir={tmp_path / 'run'}", f"data.root={small_data_root}", *SMALL_DATA,
                 "trainer.max_steps=1000", "export=false", "ckpt_path=auto"]

    def run(name: str) -> tuple[subprocess.Popen, object]:
        log = tmp_path / f"{name}.txt"
        with open(log, "w") as out:
            started.append(subprocess.Popen([sys.executable, "train.py", *overrides], cwd=REPO, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True))
        return started[-1], log

    yield run
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(process, log, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_a_second_run_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, start):
    first, first_log = start("first")
    wait_for(first, first_log, "step 1/1000")

    second, second_log = start("second")
    began = time.monotonic()
    assert second.wait(timeout=120) == 1, second_log.read_text()[-3000:]
    refusal = second_log.read_text()
    assert f"{tmp_path / 'run'} is in use by another run (pid {first.pid} on {socket.gethostname()}, started" in refusal
    assert "Seed set" not in refusal and "Traceback" not in refusal  # refused before any work, in one message
    assert time.monotonic() - began < 90
    assert first.poll() is None  # the first run trains on

    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third, third_log = start("third")
    wait_for(third, third_log, "step 1/1000")
    assert f"taking over the run directory from pid {first.pid} on {socket.gethostname()}" in third_log.read_text()
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=120) == 0, third_log.read_text()[-3000:]
    assert not (tmp_path / "run" / ".ov_train.lock.json").exists()  # released on its way out
