"""Checkpoints: `ckpt_path=last` resumes model, optimizer and schedule under a sharded engine; sharded
checkpoints consolidate (ov-export, model.init_from) into stock transformers models.

The FSDP2 runs use 2 CPU processes; their probe (tests.integration.test_strategies.Probe) records each
rank's state when training starts and ends, and its weight shards at the end. The single-process export
round trip with logits is in test_train.py, DeepSpeed's ZeRO checkpoints in test_strategies.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

from ov_train.checkpoints.reading import checkpoint_format
from ov_train.cli.export import main as ov_export
from ov_train.config.run_plan import ConfigError
from ov_train.model.forward import forward_logits
from ov_train.model.layout import part_of
from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config
from tests.integration.test_strategies import probe_records, run_train, train_overrides
from tests.integration.test_train import _held_out_batch

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory, small_data_root):
    """2 steps of a 3-step run on 2 processes (one epoch of 2 batches), then `ckpt_path=last` in the same run
    directory up to step 3 (a resume keeps trainer.max_steps: the schedule spans it)."""
    root = tmp_path_factory.mktemp("fsdp2")
    run_dir = root / "run"
    overrides = [*train_overrides(small_data_root, "onevision", 3, run_dir), "strategy=fsdp2", "trainer.devices=2"]
    stop_at_2 = ["+trainer.limit_train_batches=2", "+trainer.max_epochs=1", "trainer.limit_val_batches=0"]
    run_train([*overrides, *stop_at_2], run_dir, root / "first")
    run_train([*overrides, "ckpt_path=last"], run_dir, root / "resumed")
    return root


def trained_weights(probe) -> dict[str, torch.Tensor]:
    """The full weights at the end of training, from each rank's FSDP2 shards (dim-0 chunks, in rank order)."""
    shards = [torch.load(p) for p in sorted(probe.glob("weights_rank*.pt"))]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def test_ckpt_path_last_needs_a_checkpoint(tmp_path, small_data_root):
    cfg = compose_config([f"data.root={small_data_root}", *SMALL_DATA, "ckpt_path=last"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match="ckpt_path=last: no checkpoint at .*checkpoints/last.ckpt"):
        train(cfg)


def test_fsdp2_resume_restores_weights_optimizer_and_schedule(fsdp2_run):
    first_end = probe_records(fsdp2_run / "first", "end")
    resumed_start = probe_records(fsdp2_run / "resumed", "start")
    assert [r["step"] for r in first_end] == [2, 2] and [r["step"] for r in resumed_start] == [2, 2]
    # Every rank continues from its own shards of weights and Adam moments, at the learning rates it stopped at.
    for end, start in zip(first_end, resumed_start):
        assert start["fingerprint"] == end["fingerprint"]
        assert start["groups"] == end["groups"]
    assert [r["step"] for r in probe_records(fsdp2_run / "resumed", "end")] == [3, 3]


def test_fsdp2_checkpoint_exports_the_trained_model(fsdp2_run, small_data_root, tmp_path):
    ckpt = fsdp2_run / "run" / "checkpoints" / "last.ckpt"
    assert checkpoint_format(ckpt) == "fsdp2" and len(list(ckpt.glob("*.distcp"))) == 2
    assert ov_export([str(ckpt), str(tmp_path / "export")]) == 0
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # The weights are the ranks' shards put together, so the export computes the trained model's logits.
    trained = trained_weights(fsdp2_run / "resumed")
    exported = dict(model.named_parameters())
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k].detach(), trained[k]) for k in trained)
    reference = LlavaOnevisionForConditionalGeneration(model.config)
    reference.load_state_dict(trained)
    batch = _held_out_batch(model, AutoTokenizer.from_pretrained(tmp_path / "export"), small_data_root)
    model.eval(), reference.eval()
    with torch.no_grad():
        # Weights are equal bit for bit (above); the logits may differ at float32 rounding level because CPU
        # kernels pick their blocking from tensor alignment and layout, which loading paths don't share and
        # CI machines' CPUs choose differently: the tolerance is the other fp32 parity tests'.
        assert torch.allclose(forward_logits(model, batch), forward_logits(reference, batch), atol=1e-5, rtol=1e-4)
    # train() exported the same consolidation at the end of the run.
    run_export = LlavaOnevisionForConditionalGeneration.from_pretrained(fsdp2_run / "run" / "export").state_dict()
    assert all(torch.equal(v, run_export[k]) for k, v in model.state_dict().items())


def test_init_from_a_sharded_checkpoint(fsdp2_run, small_data_root, tmp_path):
    ckpt = fsdp2_run / "run" / "checkpoints" / "last.ckpt"
    overrides = ["stage=pretrain", "trainer.max_steps=1", f"data.root={small_data_root}", *SMALL_DATA]
    overrides.append(f"model.init_from={ckpt}")
    train(compose_config(overrides, run_dir=tmp_path))
    before = trained_weights(fsdp2_run / "resumed")
    after = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export").state_dict()
    # Pretrain moves the projector only: everything else is the checkpoint's, exactly.
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and {part_of(k) for k in changed} == {"projector"}
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1
