"""Checkpoints users hand us (ov-export, model.init_from, ckpt_path) are read as tensors and plain data: a pickle
that would run code is refused with the reason, before anything is built; a file that is not a checkpoint gets
a message naming it, not a traceback."""
from __future__ import annotations

import datetime
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ov_train.checkpoints.reading import checkpoint_metadata
from ov_train.checkpoints.saving import AtomicCheckpointIO
from ov_train.cli.export import main as ov_export
from ov_train.config.run_plan import ConfigError, model_plan
from ov_train.model.build import build_model
from ov_train.run import train
from tests.conftest import compose_config


class RunsCode:
    """Unpickling this creates `marker`: what a malicious checkpoint does, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_and_tokenizer) -> dict:
    """A single-file checkpoint as ov_train writes it (weights, ov_train metadata), as a dict to tamper with."""
    model, tokenizer = tiny_model_and_tokenizer
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    return {
        "global_step": 1,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "ov_train": {"model_config": model.config.to_dict(), "tokenizer_dir": str(tokenizer_dir)},
    }


def with_metadata(checkpoint: dict, **extra) -> dict:
    return {**checkpoint, "ov_train": {**checkpoint["ov_train"], **extra}}


def export_refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        ov_export([str(a) for a in args])
    assert exit_.value.code == 2  # argparse's usage error: a message, no traceback
    return capsys.readouterr().err


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(checkpoint, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save(with_metadata(checkpoint, note=RunsCode(marker)), evil)

    err = export_refused(capsys, evil, tmp_path / "out")
    assert f"{evil}: refused to load: it asks for io.open" in err and "--trust-checkpoint" in err
    assert not (tmp_path / "out").exists()

    cfg = compose_config([f"model.init_from={evil}"])
    with pytest.raises(ValueError, match="refused to load"):
        build_model(model_plan(cfg.model, trust=False), tmp_path)

    # Resuming: checked before any work, and Lightning's own load (through our CheckpointIO) refuses it too,
    # even where the environment turns torch's weights_only default off.
    with pytest.raises(ConfigError, match=f"ckpt_path={evil}: {evil}: refused to load"):
        train(compose_config([f"ckpt_path={evil}"], run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="refused to load"):
        AtomicCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()


class RunsShell:
    """The classic payload: os.system, whose module torch's weights-only unpickler blocks outright."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_a_shell_payload_is_refused_naming_what_it_asks_for(checkpoint, tmp_path, capsys):
    evil = tmp_path / "shell.ckpt"
    torch.save(with_metadata(checkpoint, note=RunsShell()), evil)
    err = export_refused(capsys, evil, tmp_path / "out")
    assert f"{evil}: refused to load: it asks for {os.system.__module__}.system" in err and "--trust-checkpoint" in err


def test_trust_checkpoint_loads_what_weights_only_refuses(checkpoint, tmp_path, capsys):
    # A harmless object outside the weights-only allowlist: refused, then exported when trusted.
    odd = tmp_path / "odd.ckpt"
    torch.save(with_metadata(checkpoint, written=datetime.date(2024, 1, 1)), odd)
    assert "it asks for datetime.date" in export_refused(capsys, odd, tmp_path / "out")
    assert ov_export([str(odd), str(tmp_path / "out"), "--trust-checkpoint"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    model, _ = build_model(model_plan(compose_config([f"model.init_from={odd}"]).model, trust=True), tmp_path)
    assert torch.equal(model.lm_head.weight, checkpoint["state_dict"]["model.lm_head.weight"])


def test_not_a_checkpoint_gets_a_message_naming_the_file(checkpoint, tmp_path, capsys):
    whole = tmp_path / "whole.ckpt"
    torch.save(checkpoint, whole)
    data = whole.read_bytes()
    cases = {
        "truncated.ckpt": data[: len(data) // 2],
        "notes.ckpt": b'{"not": "a checkpoint"}',
        "empty.ckpt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        err = export_refused(capsys, tmp_path / name, tmp_path / "out")
        assert f"{tmp_path / name}: not a torch checkpoint" in err
    # A zip archive whose pickle is damaged, and a torch file that holds something else than a checkpoint.
    damaged, at = bytearray(data), data.index(b"data.pkl") + 40
    damaged[at: at + 64] = b"\xff" * 64
    (tmp_path / "damaged.ckpt").write_bytes(bytes(damaged))
    assert f"{tmp_path / 'damaged.ckpt'}: not a readable checkpoint" in export_refused(
        capsys, tmp_path / "damaged.ckpt", tmp_path / "out"
    )
    torch.save([torch.zeros(2)], tmp_path / "tensors.pt")
    assert "not a Lightning checkpoint" in export_refused(capsys, tmp_path / "tensors.pt", tmp_path / "out")
    (tmp_path / "folder").mkdir()
    assert "folder: not a checkpoint" in export_refused(capsys, tmp_path / "folder", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sharded_checkpoints_are_checked_pickle_by_pickle(checkpoint, tmp_path):
    """FSDP2 (torch.distributed.checkpoint) and DeepSpeed directories: every pickle that Lightning, DCP or
    DeepSpeed would unpickle later, some with weights_only=False, is read safely first."""
    marker = tmp_path / "pwned"
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}

    def fsdp2(name: str, group_name=None, meta_pt=meta) -> Path:
        path = tmp_path / name
        state = {"state_dict": {"model.w": torch.ones(2)}, "optimizer_0": {"param_groups": [{"lr": 0.1, "name": group_name or "llm"}]}}
        dcp.save(state, checkpoint_id=path, no_dist=True)
        torch.save(meta_pt, path / "meta.pt")
        return path

    assert checkpoint_metadata(fsdp2("good"))["global_step"] == 1
    for path in (fsdp2("bytes_entry", group_name=RunsCode(marker)), fsdp2("meta_pt", meta_pt={**meta, "x": RunsCode(marker)})):
        with pytest.raises(ValueError, match="refused to load: it asks for io.open"):
            checkpoint_metadata(path)
    dcp_meta = fsdp2("dcp_metadata") / ".metadata"
    dcp_meta.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=r"\.metadata: refused to load: it asks for io.open"):
        checkpoint_metadata(dcp_meta.parent)

    def deepspeed(name: str, model_states=meta, optim_states=None, tag="checkpoint") -> Path:
        path = tmp_path / name
        (path / "checkpoint").mkdir(parents=True)
        (path / "latest").write_text(tag)
        torch.save(model_states, path / "checkpoint" / "mp_rank_00_model_states.pt")
        torch.save(optim_states or {"optimizer_state_dict": {}}, path / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return path

    assert checkpoint_metadata(deepspeed("ds_good"))["global_step"] == 1
    for path in (deepspeed("ds_model", model_states={**meta, "x": RunsCode(marker)}),
                 deepspeed("ds_optim", optim_states={"loss_scaler": RunsCode(marker)})):
        with pytest.raises(ValueError, match="refused to load: it asks for io.open"):
            checkpoint_metadata(path)
    with pytest.raises(ValueError, match="names '../../elsewhere', outside the checkpoint directory"):
        checkpoint_metadata(deepspeed("ds_escape", tag="../../elsewhere"))
    assert not marker.exists()
