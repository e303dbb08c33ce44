"""Exact resume: 6 steps straight equal 3 steps, stop, resume to 6 (same batches, bit-identical weights), also with
bf16 weights, whose fp32 masters live in the optimizer's state."""
import csv
import json

import pytest
import torch

from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def consumed(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines()]


def checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("workers, precision, batching", [
    (0, "32-true", "tokens"), (2, "32-true", "tokens"), (0, "bf16-true", "tokens"),
    # Compute budgets: each reader's state also holds the samples its lookahead held back.
    (2, "32-true", "compute"),
])
def test_resumed_run_matches_straight_run(tmp_path, small_data_root, workers, precision, batching):
    overrides = [
        f"data.batching={batching}",
        f"data.root={small_data_root}", *SMALL_DATA, "logger=csv", "export=false", "trainer.max_steps=6",
        f"trainer.precision={precision}",
        f"data.num_workers={workers}", "data.record_keys=true", "trainer.limit_val_batches=0",
        # Small blocks and a budget that closes some batches before batch_size: resume points fall
        # mid-block and right after a sample that did not fit.
        "data.shuffle_buffer=16", "data.max_tokens_per_batch=400",
    ]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    train(compose_config(overrides, run_dir=straight))
    # The same 6-step schedule (max_steps sets it) stopped after 3 batches, as 3 epochs of one batch:
    # each epoch's loader iterator restarts the workers, which must continue the streams too.
    train(compose_config([*overrides, "+trainer.limit_train_batches=1", "+trainer.max_epochs=3"], run_dir=first))
    assert checkpoint(first)["global_step"] == 3
    train(compose_config([*overrides, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"], run_dir=resumed))

    assert consumed(straight) == consumed(first) + consumed(resumed)
    assert [r["step"] for r in consumed(resumed)] == [4, 5, 6]
    assert any(len(r["keys"]) < 4 for r in consumed(straight)), "the token budget should close some batches early"
    assert any(len(r["keys"]) > 1 for r in consumed(straight))
    a, b = checkpoint(straight), checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (state_a,), (state_b,) = a["optimizer_states"], b["optimizer_states"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, tensors in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][index][k]) for k, v in tensors.items())
    if precision == "bf16-true":
        assert {v.dtype for v in a["state_dict"].values() if v.is_floating_point()} == {torch.bfloat16}
        assert {v.dtype for s in state_a["state"].values() for k, v in s.items() if k != "step"} == {torch.float32}
    # The stream position and the realized-mix counts carry over too.
    assert a["callbacks"]["StreamState"] == b["callbacks"]["StreamState"]
    assert a["callbacks"]["StreamState"]["consumed"] == 6

    # The realized mix is logged: each modality's share of the samples consumed so far.
    with open(next(straight.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    last = [r for r in rows if r.get("data/mix_modality_video")][-1]
    # One process: no rank waits for another.
    assert {float(r["perf/rank_imbalance"]) for r in rows if r.get("perf/rank_imbalance")} == {1.0}
    keys = [k for r in consumed(straight) for k in r["keys"]]
    for modality in ("single_image", "multi_image", "video"):
        share = sum(k.startswith(modality) for k in keys) / len(keys)
        assert float(last[f"data/mix_modality_{modality}"]) == pytest.approx(share)
        assert float(last[f"data/mix_{modality}"]) == pytest.approx(share)


def test_resume_refuses_another_schedule_stage_or_model_before_any_work(tmp_path, small_data_root, monkeypatch):
    """The checkpoint records its run (stage, model and geometry, max_steps, seed); a resume that differs is refused
    with what differs, before the model is built, instead of a jumping learning rate, a run that trains nothing,
    or a tensor size error."""
    import ov_train.run as run
    from ov_train.config.run_plan import ConfigError

    base = [f"data.root={small_data_root}", *SMALL_DATA, "export=false", "trainer.limit_val_batches=0", "trainer.max_steps=1"]
    train(compose_config(base, run_dir=tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["ov_train"]["run"] == {
        "stage": "onevision", "model": "tiny", "max_steps": 1, "seed": 0,
        "geometry": {"vision": dict(compose_config([]).model.vision), "text": dict(compose_config([]).model.text)},
    }

    def heavy(*args, **kwargs):
        raise AssertionError("the model was built before the resume was checked")

    monkeypatch.setattr(run, "build_for_training", heavy)
    cases = {
        "trainer.max_steps=3": ["trainer.max_steps: the checkpoint's run has 1, this one 3", "trainer.max_steps=1"],
        "stage=pretrain": ["stage: the checkpoint's 'onevision', this run's 'pretrain'"],
        "model.text.hidden_size=256": ["model.text.hidden_size: the checkpoint's 192, this run's 256"],
        "model=ov_qwen2_0_5b": ["model: the checkpoint's 'tiny', this run's 'ov_qwen2_0_5b'"],
        "seed=1": ["seed: the checkpoint's run has seed=0, this one seed=1", "an exact resume needs seed=0"],
    }
    for override, expected in cases.items():
        extra = ["model.random_init=true"] if override.startswith("model=") else []
        with pytest.raises(ConfigError) as err:
            train(compose_config([*base, override, *extra, "ckpt_path=last"], run_dir=tmp_path))  # the later value wins
        assert f"ckpt_path={last} is not a checkpoint of this run" in str(err.value)
        assert all(text in str(err.value) for text in expected), str(err.value)


def test_a_requeue_of_a_finished_run_keeps_its_summary(tmp_path, small_data_root):
    """ckpt_path=auto after the run ended (a requeued job that had finished): nothing trains, and the summary of the
    run that trained it (its held-out accuracy) is not replaced by an empty one."""
    overrides = [f"data.root={small_data_root}", *SMALL_DATA, "export=false", "trainer.max_steps=1",
                 "data.val_samples=4", "ckpt_path=auto"]
    first = train(compose_config(overrides, run_dir=tmp_path))
    assert first["val_accuracy"] is not None and first["steps"] == 1
    again = train(compose_config(overrides, run_dir=tmp_path))
    assert again == first == json.loads((tmp_path / "summary.json").read_text())


def test_auto_falls_back_past_a_truncated_last_ckpt_to_the_newest_kept_one(tmp_path, small_data_root, caplog):
    overrides = [f"data.root={small_data_root}", *SMALL_DATA, "export=false", "trainer.max_steps=4",
                 "trainer.limit_val_batches=0", "checkpoint.every_n_steps=1", "checkpoint.keep=1", "ckpt_path=auto"]
    train(compose_config([*overrides, "+trainer.limit_train_batches=2", "+trainer.max_epochs=1"], run_dir=tmp_path))
    checkpoints = tmp_path / "checkpoints"
    last, kept = checkpoints / "last.ckpt", checkpoints / "step=2.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short (a full disk, an interrupted copy)

    with caplog.at_level("INFO"):
        summary = train(compose_config(overrides, run_dir=tmp_path))
    assert (f"skipped {last}: not a torch checkpoint (no zip archive: a different kind of file, or truncated);"
            f" resuming from {kept}, the newest checkpoint that reads") in caplog.text
    assert f"resuming from {kept} at step 2" in caplog.text
    assert summary["steps"] == 4 and checkpoint(tmp_path)["global_step"] == 4  # last.ckpt whole again
