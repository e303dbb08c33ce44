"""Every error exits non-zero promptly, with loader workers or not: a data error raised in a loader worker used to
print its message and Hydra's error line, then hang for ever in the interpreter's exit (the workers ignore the
SIGTERM multiprocessing stops them with, since they must outlive a group SIGTERM)."""
from __future__ import annotations

import errno
import os
import sys
import time

import pytest

from tests.conftest import SMALL_DATA
from tests.processes import exit_of

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

BOUND_S = 120  # start-up (imports, the tiny model, two ranks) takes most of it on 2 loaded cores
TOO_LONG = ["stage.max_length=8", "data.max_skips_in_a_row=25"]


def train_exit(tmp_path, *overrides) -> tuple[int | None, str, float]:
    """`python train.py` with `overrides`: its exit status (None: still running after BOUND_S), its output and how
    long it ran; nothing it started may outlive it."""
    run_dir = tmp_path / "run"
    log = tmp_path / "output.txt"
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "logger=csv", "trainer.max_steps=4",
               "export=false", *overrides]
    start = time.monotonic()
    rc, left = exit_of(command, log, timeout=BOUND_S)
    took = time.monotonic() - start
    assert not left, f"exit {rc} after {took:.0f} s, leaving {left}"
    return rc, log.read_text(), took


def small_data(small_data_root, workers: int) -> list[str]:
    return [f"data.root={small_data_root}", *(o for o in SMALL_DATA if not o.startswith(("data.num_workers", "logger"))),
            f"data.num_workers={workers}"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_data_error_in_loader_workers_exits_1(tmp_path, small_data_root, workers):
    rc, output, took = train_exit(tmp_path, *small_data(small_data_root, workers), *TOO_LONG)
    assert rc == 1, f"exit {rc} after {took:.0f} s (None: still running)\n{output[-3000:]}"
    assert "25 training samples in a row skipped: too_long 25 (stage.max_length=8)" in output


def test_a_random_bytes_shard_exits_1_naming_its_source(tmp_path):
    root = tmp_path / "shards"
    (root / "noise").mkdir(parents=True)
    (root / "noise" / "train-000000.tar").write_bytes(os.urandom(64 * 1024))
    recipe = tmp_path / "noise.yaml"
    recipe.write_text("sources:\n  - {name: noise, path: noise, modality: single_image, weight: 1}\n")
    rc, output, took = train_exit(tmp_path, "data=recipe", f"data.recipe={recipe}", f"data.root={root}",
                                  "data.num_workers=2", "data.io.retries=0", "trainer.enable_progress_bar=false")
    assert rc == 1, f"exit {rc} after {took:.0f} s (None: still running)\n{output[-3000:]}"
    assert "noise" in output and "no training samples" in output
    # The error itself names the shard, not only a warning far above it.
    assert f"1 of its 1 shard(s) unreadable and set aside: {root / 'noise' / 'train-000000.tar'}" in output


def test_a_data_error_under_ddp_on_two_processes_exits_non_zero(tmp_path, small_data_root):
    rc, output, took = train_exit(tmp_path, *small_data(small_data_root, 1), *TOO_LONG, "strategy=ddp",
                                  "trainer.accelerator=cpu", "trainer.devices=2")
    assert rc not in (None, 0), f"exit {rc} after {took:.0f} s (None: still running)\n{output[-3000:]}"
    assert "training samples in a row skipped: too_long" in output


def test_a_checkpoint_the_disk_will_not_take_exits_1_naming_it(tmp_path, small_data_root):
    """A file-size limit (ulimit -f, SIGXFSZ ignored as a shell trap does) below the first checkpoint's size: one
    line says which file and why, instead of torch's "enforce fail" traceback."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.max_steps=2", "export=false",
               "checkpoint.every_n_steps=1", *small_data(small_data_root, 0)]
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 4096; exec "$@"', "limited", *command]  # 4 MiB
    rc, left = exit_of(limited, tmp_path / "output.txt", timeout=BOUND_S)
    output = (tmp_path / "output.txt").read_text()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert rc == 1 and not left, output[-3000:]
    assert (f"[Errno {errno.EFBIG}] File too large: '{last}': the checkpoint was not written; last.ckpt is as it was"
            " before") in output
    assert "enforce fail" not in output and "Traceback" not in output
    assert not last.exists() and not list(last.parent.iterdir())  # nothing half-written left behind


def test_an_error_on_rank_0_alone_ends_the_rank_it_started(tmp_path, small_data_root):
    """Rank 0 fails in its step while rank 1 is stuck in its own (as in a collective whose peer died: gloo notices
    a closed connection, NCCL waits for its timeout); rank 1 may not outlive the run."""
    run_dir, log = tmp_path / "run", tmp_path / "output.txt"
    command = [sys.executable, "-m", "tests.integration.test_error_exits", f"hydra.run.dir={run_dir}", "logger=csv",
               "trainer.max_steps=6", "export=false", *small_data(small_data_root, 1), "strategy=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2"]
    start = time.monotonic()
    rc, left = exit_of(command, log, timeout=BOUND_S, env={"OV_FAIL_AT": "0:2", "OV_STUCK_AT": "1:2"})
    output, took = log.read_text(), time.monotonic() - start
    assert not left, f"exit {rc} after {took:.0f} s, leaving {left}"
    assert rc not in (None, 0), f"exit {rc} after {took:.0f} s (None: still running)\n{output[-3000:]}"
    assert "injected failure on rank 0 at step 2" in output


def _failing_main() -> None:
    """ov-train whose training step raises on one rank at one step (OV_FAIL_AT=RANK:STEP) and never returns on
    another (OV_STUCK_AT=RANK:STEP)."""
    from ov_train.cli import main
    from ov_train.training.module import OneVisionModule

    fail_rank, fail_step = map(int, os.environ["OV_FAIL_AT"].split(":"))
    stuck_rank, stuck_step = map(int, os.environ["OV_STUCK_AT"].split(":"))
    step = OneVisionModule.training_step

    def failing(self, batch, batch_idx):
        if (self.global_rank, self.trainer.global_step) == (fail_rank, fail_step):
            raise RuntimeError(f"injected failure on rank {fail_rank} at step {fail_step}")
        if (self.global_rank, self.trainer.global_step) == (stuck_rank, stuck_step):
            time.sleep(3600)
        return step(self, batch, batch_idx)

    OneVisionModule.training_step = failing
    main()


if __name__ == "__main__":
    _failing_main()
