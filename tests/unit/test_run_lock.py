"""The run directory lock: a second holder is refused naming the first; a record left by a killed holder is taken
over, saying so; the lock goes with the run, however it ends."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest

from ov_train.utils.run_lock import RunDirBusy, hold_run_dir


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    lock = tmp_path / "run" / ".ov_train.lock"
    holder = rf"\(pid {os.getpid()} on {socket.gethostname()}, started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"
    refused = pytest.raises(RunDirBusy, match=rf"^{tmp_path / 'run'} is in use by another run {holder}")
    with hold_run_dir(lock), refused, hold_run_dir(lock):
        pass
    with hold_run_dir(lock):  # released: the next run goes ahead
        pass


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    lock = tmp_path / ".ov_train.lock"
    with pytest.raises(ValueError), hold_run_dir(lock):
        raise ValueError("the run failed")
    assert not lock.with_name(".ov_train.lock.json").exists()
    with hold_run_dir(lock):
        pass


def test_a_record_left_by_a_killed_run_is_taken_over_saying_so(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = tmp_path / ".ov_train.lock.json"
    record.write_text(json.dumps({"pid": gone.pid, "host": "node7", "started": "2026-01-01 00:00:00 UTC",
                                  "command": "train.py ckpt_path=auto"}))
    with caplog.at_level(logging.WARNING), hold_run_dir(tmp_path / ".ov_train.lock"):
        assert json.loads(record.read_text())["pid"] == os.getpid()
    assert f"taking over the run directory from pid {gone.pid} on node7, started 2026-01-01 00:00:00 UTC" in caplog.text
    assert not record.exists()
