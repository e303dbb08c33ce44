"""Checkpoints that survive a kill mid-save, a clean stop on SIGTERM, and non-finite losses caught."""
import io
import math
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger

from ov_train.checkpoints.saving import AtomicCheckpointIO, AtomicCheckpoints
from ov_train.config.run_plan import resolve_plan
from ov_train.data.prepare import prepare_data
from ov_train.model.build import build_model
from ov_train.training import module as module_py
from ov_train.training.datamodule import OneVisionData
from ov_train.training.module import OneVisionModule
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import REPO, SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_steps=2, callbacks=[checkpoints, AtomicCheckpoints()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(BoringModel())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        # Write half of what the real save would, then die as a SIGKILL / node failure would.
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[: whole.tell() // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left

    # What a SIGKILL leaves behind does not get in the way of the next save.
    (tmp_path / ".last.ckpt.partial").write_bytes(b"torn")
    trainer.save_checkpoint(last)
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert not (tmp_path / ".last.ckpt.partial").exists()


@pytest.fixture
def launch():
    """Starts `python train.py` in its own process group (as a scheduler does), output (the log too) to a file;
    whatever is still running when the test ends, failed or not, is killed with its group."""
    started = []

    def start(run_dir, output, *overrides) -> subprocess.Popen:
        command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides]
        with open(output, "w") as out:
            started.append(subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(process, output, done, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not done():
        assert process.poll() is None and time.time() < deadline, output.read_text()[-3000:]
        time.sleep(0.05)


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, small_data_root, launch):
    """kill -9 of every process right after the first periodic save; the requeued job (ckpt_path=auto) goes on
    from that step, rewrites last.ckpt in place, and on SIGTERM to its whole process group, loader workers
    included, saves at a step boundary and exits 0; so does the next one, signalled in its main process only,
    and the last, interrupted by Ctrl-C (exit 130)."""
    run_dir, max_steps = tmp_path / "run", 1000
    checkpoints, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"
    overrides = [
        f"data.root={small_data_root}", *(o for o in SMALL_DATA if not o.startswith("data.num_workers")),
        "data.num_workers=2", f"trainer.max_steps={max_steps}", "export=false", "checkpoint.every_n_steps=2",
    ]
    killed = launch(run_dir, tmp_path / "killed.txt", *overrides)
    wait_for(killed, tmp_path / "killed.txt", last.exists)  # renamed into place whole: a complete checkpoint
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    saved = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved >= 2 and saved % 2 == 0

    output = tmp_path / "requeued.txt"
    requeued = launch(run_dir, output, *overrides, "ckpt_path=auto")
    wait_for(requeued, output, lambda: f"step {saved + 2}/{max_steps}" in output.read_text())
    os.killpg(requeued.pid, signal.SIGTERM)  # what SLURM and other schedulers do
    assert requeued.wait(timeout=120) == 0, output.read_text()[-3000:]
    log = output.read_text()
    assert f"resuming from {last} at step {saved}" in log
    assert re.search(r"step (\d+)/", log).group(1) == str(saved + 1)  # the first step it trains
    assert "SIGTERM: saved" in log and "DataLoader worker" not in log
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved + 2 <= step < max_steps
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no last-v1.ckpt, no partial file
    assert not (run_dir / "summary.json").exists()  # the run did not pretend to finish

    output = tmp_path / "again.txt"
    again = launch(run_dir, output, *overrides, "ckpt_path=auto")
    wait_for(again, output, lambda: f"step {step + 1}/{max_steps}" in output.read_text())
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=120) == 0, output.read_text()[-3000:]
    assert f"resuming from {last} at step {step}" in output.read_text()
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]

    # Ctrl-C at a terminal signals the foreground group, loader workers included: saved too, exit 130.
    output = tmp_path / "interrupted.txt"
    interrupted = launch(run_dir, output, *overrides, "ckpt_path=auto")
    wait_for(interrupted, output, lambda: f"step {step + 1}/{max_steps}" in output.read_text())
    os.killpg(interrupted.pid, signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130, output.read_text()[-3000:]
    log = output.read_text()
    assert "SIGINT: saved" in log and "DataLoader worker" not in log and "Traceback" not in log
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] > step


class ParameterWatch(Callback):
    """Which training batches changed the parameters; the progress bar's train/loss after each."""

    def __init__(self):
        self.changed: dict[int, bool] = {}
        self.progress_bar: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = list(pl_module.parameters())
        self.changed[batch_idx] = any(not torch.equal(a, b) for a, b in zip(self._before, after))
        self.progress_bar[batch_idx] = trainer.progress_bar_metrics.get("train/loss")


class Recorded(Logger):
    """What a logger (W&B, CSV) receives, by step."""

    name, version = "recorded", 0

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict] = {}

    def log_metrics(self, metrics, step):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


def fit_with_nan_losses(small_data_root, nonfinite: str, poisoned: set[int], steps: int = 3, logger=False):
    """Train the tiny model for `steps` batches; in the batches numbered `poisoned`, the loss of every sample
    of the first sample's modality becomes NaN. Returns the module and the watch."""
    plan = resolve_plan(compose_config([f"data.root={small_data_root}", *SMALL_DATA, f"trainer.max_steps={steps}"]))
    model, tokenizer = build_model(plan.model, cache_dir())
    data = OneVisionData(plan.data, prepare_data(plan.data), tokenizer, VisionGeometry.from_model_config(model.config))
    module = OneVisionModule(model, plan.optim, plan.forward, nonfinite=nonfinite)
    losses, calls = module.losses, []

    def with_nans(batch, predict=False):
        sums, counts, extra = losses(batch, predict)
        if len(calls) in poisoned:
            hit = torch.tensor([m == batch["modality"][0] for m in batch["modality"]])
            sums = torch.where(hit, torch.nan, sums)
        calls.append(batch["modality"])
        return sums, counts, extra

    module.losses = with_nans
    watch = ParameterWatch()
    trainer = L.Trainer(
        max_steps=steps, callbacks=[watch], logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    return module, watch


def test_skip_drops_the_update_of_a_nan_batch_and_counts_it(small_data_root):
    recorded = Recorded()
    module, watch = fit_with_nan_losses(small_data_root, "skip", poisoned={1}, logger=recorded)
    assert watch.changed == {0: True, 1: False, 2: True}
    assert module.nonfinite_batches == 1
    assert module.trainer.callback_metrics["train/nonfinite_batches"] == 1
    assert module.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # The skipped step shows its own, non-finite loss, never the step before's (Lightning re-sends a key's last
    # value to loggers and the progress bar on steps that do not log it).
    # Dashboards number steps as the console does: batch k is logged as step k + 1.
    rows = recorded.rows
    assert [rows[step]["train/nonfinite_batches"] for step in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(rows[2]["train/loss"]) and math.isnan(watch.progress_bar[1])
    assert all(math.isfinite(rows[step]["train/loss"]) for step in (1, 3))
    assert all(math.isfinite(watch.progress_bar[step]) for step in (0, 2))


def test_stop_names_the_step_and_the_modality(small_data_root):
    with pytest.raises(FloatingPointError, match=r"step 1 \(batch 1\), on 1 of 1 rank\(s\): train/loss_\w+=nan"):
        fit_with_nan_losses(small_data_root, "stop", poisoned={1})


def test_skip_gives_up_when_every_batch_is_non_finite(small_data_root, monkeypatch):
    monkeypatch.setattr(module_py, "MAX_NONFINITE_IN_A_ROW", 3)
    with pytest.raises(FloatingPointError, match="3 batches in a row"):
        fit_with_nan_losses(small_data_root, "skip", poisoned={0, 1, 2, 3}, steps=4)
