"""Checkpoints that survive a kill mid-save, a clean stop on SIGTERM, and non-finite losses caught."""
import io
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from ov_train.model.build import build_model
from ov_train.run import train
from ov_train.training import module as module_py
from ov_train.training.callbacks import AtomicCheckpointIO, AtomicCheckpoints
from ov_train.training.datamodule import OneVisionData
from ov_train.training.module import OneVisionModule
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import REPO, SMALL_DATA, compose_config


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
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left

    # What a SIGKILL leaves behind does not get in the way of the next save.
    (tmp_path / ".last.ckpt.partial").write_bytes(b"torn")
    trainer.save_checkpoint(last)
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert not (tmp_path / ".last.ckpt.partial").exists()


def _log_shows_step(log_file, step: int) -> bool:
    return log_file.exists() and f"step {step}/" in log_file.read_text()


def test_sigterm_saves_last_checkpoint_at_a_step_boundary_and_exits_cleanly(tmp_path, small_data_root):
    run_dir, max_steps = tmp_path / "run", 1000
    command = [
        sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"data.root={small_data_root}", *SMALL_DATA,
        f"trainer.max_steps={max_steps}", "export=false",
    ]
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while not _log_shows_step(run_dir / "train.log", 2):  # TrainingMetrics logs a line per logging step
            assert process.poll() is None and time.time() < deadline, (tmp_path / "output.txt").read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, (tmp_path / "output.txt").read_text()[-3000:]
    assert "SIGTERM: saved" in (run_dir / "train.log").read_text()
    assert not (run_dir / "summary.json").exists()  # the run did not pretend to finish
    last = run_dir / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert 2 <= step < max_steps

    # Requeued: the same run directory resumes from the checkpoint and trains on.
    overrides = [f"data.root={small_data_root}", *SMALL_DATA, f"trainer.max_steps={step + 2}", f"ckpt_path={last}"]
    assert train(compose_config(overrides, run_dir=run_dir))["steps"] == step + 2


class ParameterWatch(Callback):
    """Which training batches changed the parameters."""

    def __init__(self):
        self.changed: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = list(pl_module.parameters())
        self.changed[batch_idx] = any(not torch.equal(a, b) for a, b in zip(self._before, after))


def fit_with_nan_losses(small_data_root, nonfinite: str, poisoned: set[int], steps: int = 3):
    """Train the tiny model for `steps` batches; in the batches numbered `poisoned`, the loss of every sample
    of the first sample's modality becomes NaN. Returns the module and the watch."""
    cfg = compose_config([f"data.root={small_data_root}", *SMALL_DATA])
    model, tokenizer = build_model(cfg.model, cache_dir())
    data = OneVisionData(cfg.data, cfg.stage, tokenizer, VisionGeometry.from_model_config(model.config), cfg.seed)
    module = OneVisionModule(model, cfg.stage, cfg.model.lr_scale, steps, nonfinite=nonfinite)
    losses, calls = module._losses, []

    def with_nans(batch, predict=False):
        sums, counts, extra = losses(batch, predict)
        if len(calls) in poisoned:
            hit = torch.tensor([m == batch["modality"][0] for m in batch["modality"]])
            sums = torch.where(hit, torch.nan, sums)
        calls.append(batch["modality"])
        return sums, counts, extra

    module._losses = with_nans
    watch = ParameterWatch()
    trainer = L.Trainer(
        max_steps=steps, callbacks=[watch], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=data)
    return module, watch


def test_skip_drops_the_update_of_a_nan_batch_and_counts_it(small_data_root):
    module, watch = fit_with_nan_losses(small_data_root, "skip", poisoned={1})
    assert watch.changed == {0: True, 1: False, 2: True}
    assert module.nonfinite_batches == 1
    assert module.trainer.callback_metrics["train/nonfinite_batches"] == 1
    assert module.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stop_names_the_step_and_the_modality(small_data_root):
    with pytest.raises(FloatingPointError, match=r"step 1 \(batch 1\), on 1 of 1 rank\(s\): train/loss_\w+=nan"):
        fit_with_nan_losses(small_data_root, "stop", poisoned={1})


def test_skip_gives_up_when_every_batch_is_non_finite(small_data_root, monkeypatch):
    monkeypatch.setattr(module_py, "MAX_NONFINITE_IN_A_ROW", 3)
    with pytest.raises(FloatingPointError, match="3 batches in a row"):
        fit_with_nan_losses(small_data_root, "skip", poisoned={0, 1, 2, 3}, steps=4)
