"""Preemption and requeue: a SIGTERM saves last.ckpt and ends the run as a clean exit; the same command again with
`ckpt_path=auto` in the same run directory (what a requeued SLURM job runs) ends with the weights, optimizer state
and data position of a run that was never interrupted, wherever the signal came: between training steps, or in
the middle of the first validation.

The signal is a real SIGTERM through Lightning's handler, sent by the run to itself at a chosen point so the point
is exact; the runs are in-process train() calls of one config (the exit code a process would have is the
SystemExit's). test_robustness.py sends it from outside to a train.py process; test_strategies.py requeues ZeRO-3.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import ov_train.run as run
from ov_train.run import build_callbacks
from tests.conftest import SMALL_DATA, compose_config

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

STEPS = 4


def overrides(data_root) -> list[str]:
    return [
        f"data.root={data_root}", *SMALL_DATA, "export=false", f"trainer.max_steps={STEPS}",
        # Validate at steps 2 and 4, 2 batches each: a signal after the first batch lands inside one.
        "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "data.record_keys=true", "ckpt_path=auto",
    ]


class SigtermAt(Callback):
    """Sends this process SIGTERM once: after training step `step`, or after the first batch of the first validation."""

    def __init__(self, where: str, step: int = 0):
        self.where, self.step, self.sent = where, step, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "training" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.where == "validation" and batch_idx == 0:
            self._send()


def train(cfg, *extra_callbacks):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "build_callbacks", lambda plan: [*build_callbacks(plan), *extra_callbacks])
        return run.train(cfg)


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def consumed(run_dir) -> list[list[str]]:
    return [json.loads(line)["keys"] for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data_root):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config(overrides(small_data_root), run_dir=run_dir))
    return run_dir


@pytest.mark.parametrize(("where", "step", "saved_at"), [("training", 3, 3), ("validation", 0, 2)])
def test_sigterm_then_the_same_command_continues_to_the_uninterrupted_weights(
    tmp_path, small_data_root, uninterrupted, where, step, saved_at
):
    cfg = lambda: compose_config(overrides(small_data_root), run_dir=tmp_path)  # noqa: E731 (a fresh copy per run)
    with pytest.raises(SystemExit) as stopped:
        train(cfg(), SigtermAt(where, step))
    assert stopped.value.code in (None, 0)  # a process would exit 0
    assert checkpoint(tmp_path)["global_step"] == saved_at
    assert not (tmp_path / "summary.json").exists()

    summary = train(cfg())
    assert summary["steps"] == STEPS  # requeued: ckpt_path=auto finds last.ckpt
    a, b = checkpoint(uninterrupted), checkpoint(tmp_path)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (state_a,), (state_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, tensors in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][index][k]) for k, v in tensors.items())
    # The same batches, none twice, and the stream where the uninterrupted one is.
    assert consumed(tmp_path) == consumed(uninterrupted)
    assert a["callbacks"]["StreamState"] == b["callbacks"]["StreamState"]
    # Validation runs at the steps it runs at uninterrupted, so the held-out numbers are the same too (a SIGTERM save
    # once left the run's batch count one ahead: the resumed run validated a step early, on other weights).
    reference = json.loads((uninterrupted / "summary.json").read_text())
    assert (summary["val_loss"], summary["val_by_modality"]) == (reference["val_loss"], reference["val_by_modality"])
    assert predictions(tmp_path) == predictions(uninterrupted)


def predictions(run_dir) -> list[str]:
    return sorted(path.name for path in (run_dir / "predictions").iterdir())
