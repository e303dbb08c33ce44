"""Checkpoints while training runs: `last.ckpt` every checkpoint.every_n_steps and/or every_minutes, rewritten in
place on resume, plus the `keep` most recent as step=<N>.ckpt; the checkpoint keys are checked up front; a resume
falls back past a checkpoint that does not read; a save the disk will not take is named, the previous one kept."""
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from ov_train.checkpoints import saving
from ov_train.checkpoints.paths import resume_candidates, resume_targets
from ov_train.checkpoints.reading import resume_problems
from ov_train.checkpoints.saving import AtomicCheckpointIO, AtomicCheckpoints, CheckpointWriteError, PeriodicCheckpoint
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.run import build_callbacks
from tests.conftest import REPO, compose_config


class Saves(Callback):
    """The global step of every checkpoint written."""

    def __init__(self):
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(checkpoint["global_step"])


def fit(directory: Path, max_steps: int, ckpt_path=None, **cadence) -> list[int]:
    saves = Saves()
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[PeriodicCheckpoint(directory, **cadence), AtomicCheckpoints(), saves],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return saves.steps


def test_every_n_steps_keeps_last_and_the_most_recent(tmp_path):
    assert fit(tmp_path, 7, every_n_steps=2, every_minutes=None, keep=2) == [2, 2, 4, 4, 6, 6]  # step=N, then last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6

    # Resumed in the same directory: last.ckpt is rewritten, never copied to last-v1.ckpt.
    assert fit(tmp_path, 9, tmp_path / "last.ckpt", every_n_steps=2, every_minutes=None, keep=2) == [8, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8


def test_minutes_and_steps_both_trigger(tmp_path):
    # A time interval shorter than a step saves at every step, whatever every_n_steps says.
    assert fit(tmp_path / "timed", 3, every_n_steps=100, every_minutes=1e-9, keep=0) == [1, 2, 3]
    assert fit(tmp_path / "stepped", 5, every_n_steps=2, every_minutes=60, keep=0) == [2, 4]  # run.py saves the end
    assert [p.name for p in (tmp_path / "stepped").iterdir()] == ["last.ckpt"]


def test_the_default_run_writes_checkpoints_while_it_trains(tmp_path):
    cfg = compose_config([], run_dir=tmp_path)
    (periodic,) = [c for c in build_callbacks(resolve_plan(cfg)) if isinstance(c, PeriodicCheckpoint)]
    assert 0 < periodic._every_n_train_steps < cfg.trainer.max_steps
    assert periodic._train_time_interval.total_seconds() == 60 * cfg.checkpoint.every_minutes


def test_bad_checkpoint_keys_are_named(tmp_path):
    cfg = compose_config(
        ["checkpoint.every_n_steps=0", "checkpoint.every_minutes=-5", "checkpoint.keep=-1"], run_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    for text in (
        "checkpoint.every_n_steps=0 must be a positive integer or null",
        "checkpoint.every_minutes=-5.0 must be a positive number or null",
        "checkpoint.keep=-1 must be an integer >= 0",
    ):
        assert text in str(err.value)
    # Types are the schema's: composition refuses them, naming the key.
    for override in ("checkpoint.every_minutes=soon", "checkpoint.trust=maybe"):
        with pytest.raises(ConfigCompositionException, match=override.split("=")[0]):
            compose_config([override])
    resolve_plan(compose_config(["checkpoint.every_n_steps=null", "checkpoint.every_minutes=null"], run_dir=tmp_path))


def test_engines_that_write_in_place_swap_a_whole_checkpoint_in(tmp_path, monkeypatch):
    """DeepSpeed and FSDP2 write from every rank, in place: save_whole has them write beside the target and
    swaps the result in, so a kill at any moment leaves a whole checkpoint that ckpt_path=auto resumes."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from ov_train.checkpoints.saving import save_whole

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), is_global_zero=True)
    last = tmp_path / "checkpoints" / "last.ckpt"

    def shards(step: int, killed_at_rank: int | None = None):
        def save(target: Path):
            target.mkdir(parents=True)
            for rank in range(2):
                if rank == killed_at_rank:
                    raise KeyboardInterrupt
                (target / f"rank{rank}.distcp").write_text(str(step))
        return save

    def steps_in(directory: Path) -> set[str]:
        return {p.read_text() for p in directory.iterdir()}

    save_whole(trainer, last, shards(1))
    with pytest.raises(KeyboardInterrupt):
        save_whole(trainer, last, shards(2, killed_at_rank=1))
    assert steps_in(last) == {"1"}
    save_whole(trainer, last, shards(3))
    assert steps_in(last) == {"3"} and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]

    real_replace, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_whole(trainer, last, shards(4))
    monkeypatch.undo()
    assert not last.exists()
    resumed = resume_targets("auto", tmp_path)[0]
    assert resumed == str(tmp_path / "checkpoints" / ".last.ckpt.previous")
    assert steps_in(Path(resumed)) == {"3"}
    save_whole(trainer, last, shards(5))
    assert steps_in(last) == {"5"} and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


IDENTITY = {"stage": "onevision", "model": "tiny", "geometry": {}, "max_steps": 8, "seed": 0}


def test_auto_resumes_the_newest_checkpoint_that_reads(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (2, 10, 4):
        torch.save({"state_dict": {}, "global_step": step, "ov_train": {"run": IDENTITY}}, checkpoints / f"step={step}.ckpt")
    (checkpoints / "step=old.ckpt").write_bytes(b"not ours")
    last = checkpoints / "last.ckpt"
    last.write_bytes((checkpoints / "step=10.ckpt").read_bytes()[:300])  # cut short: a full disk, a copy interrupted
    assert resume_candidates(tmp_path) == [last, *(checkpoints / f"step={n}.ckpt" for n in (10, 4, 2))]
    plan = resolve_plan(compose_config(["ckpt_path=auto"], run_dir=tmp_path))
    assert (plan.ckpt_path, plan.ckpt_fallbacks) == (str(last), tuple(str(checkpoints / f"step={n}.ckpt") for n in (10, 4, 2)))

    (checkpoints / "step=10.ckpt").write_bytes(b"PK\x03\x04 damaged")
    with caplog.at_level("INFO"):
        chosen, problems = resume_problems((plan.ckpt_path, *plan.ckpt_fallbacks), IDENTITY)
    assert (chosen, problems) == (str(checkpoints / "step=4.ckpt"), [])
    assert (f"skipped {last}: not a torch checkpoint (no zip archive: a different kind of file, or truncated);"
            f" {checkpoints / 'step=10.ckpt'}: not a torch checkpoint") in caplog.text
    assert f"resuming from {checkpoints / 'step=4.ckpt'}, the newest checkpoint that reads" in caplog.text
    # None that reads: each one named, and nothing resumed.
    chosen, problems = resume_problems((str(last), str(checkpoints / "step=10.ckpt")), IDENTITY)
    assert problems == [f"ckpt_path={last}: {last}: not a torch checkpoint (no zip archive: a different kind of file,"
                        f" or truncated); {checkpoints / 'step=10.ckpt'}: not a torch checkpoint (no zip archive: a"
                        " different kind of file, or truncated)"]


@pytest.mark.slow  # a process of its own: ~5 s
def test_a_file_size_limit_hit_while_saving_is_named_and_the_previous_checkpoint_kept(tmp_path):
    # A file-size limit (ulimit -f) in a process of its own; SIGXFSZ ignored, the write fails with EFBIG.
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from ov_train.checkpoints.saving import AtomicCheckpointIO, CheckpointWriteError
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"global_step": 1, "w": torch.zeros(10)}}, "{tmp_path}/last.ckpt")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            io.save_checkpoint({{"global_step": 2, "w": torch.zeros(1_000_000)}}, "{tmp_path}/last.ckpt")
        except CheckpointWriteError as err:
            print(err)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    last = tmp_path / "last.ckpt"
    assert result.stdout.strip() == (f"[Errno {errno.EFBIG}] File too large: '{last}': the checkpoint was not written;"
                                     " last.ckpt is as it was before"), result.stderr[-2000:]
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class FillsUp:
    """A file opened for writing on a disk that is full after `room` bytes."""

    def __init__(self, path, mode: str, room: int = 2_000):
        self.f, self.room = open(path, mode), room  # noqa: SIM115 - closed by __exit__, as open()'s file is

    def write(self, data) -> int:
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_saving_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    io, last = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, last)
    monkeypatch.setattr(saving, "open", FillsUp, raising=False)
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(10_000)}, last)
    assert str(err.value) == (f"[Errno {errno.ENOSPC}] No space left on device: '{last}': the checkpoint was not"
                              " written; last.ckpt is as it was before")
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_the_final_save_says_weights_only_so_lightning_logs_no_default(tmp_path, caplog):
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(BoringModel())
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        saving.save_whole(trainer, tmp_path / "last.ckpt")  # run.py's save at the end of every run
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1 and saved["optimizer_states"]  # still a whole checkpoint, resumable
