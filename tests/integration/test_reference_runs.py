"""The reference mode end to end (the experiments' composition: test_experiments.py): experiment configs train 2 steps
at tiny size; data.samples_per_step holds its global batch in 1 process and in 2 DDP processes, whose micro-batch
counts differ from rank to rank without hanging, and ZeRO-3 and FSDP2 accumulate them to DDP's weights; step bundles
resume exactly."""
import json

import pytest
import torch

from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config
from tests.integration.test_strategies import run_train, train_overrides
from tests.prebuild import SHM

pytestmark = pytest.mark.slow  # training runs, two of them in 2 processes

# At tiny size: the tiny model from random weights, one CPU process validating at the end, and the synthetic data (whose
# recipes give weights, not sample counts, so no epochs).
TINY = ["model=tiny", "model.init_from=null", "data=synthetic", "strategy=auto", "trainer.devices=1",
        "trainer.val_check_interval=null", "data.epochs=null", "trainer.max_steps=2", "data.val_samples=4"]


def consumed(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("experiment", "per_step"), [("ov_qwen2_7b/mid", 6), ("ov_qwen2_72b/pretrain", 5)])
def test_experiment_trains_two_steps_at_tiny_size_one_process(tmp_path, small_data_root, experiment, per_step):
    overrides = [f"experiment={experiment}", *TINY, f"data.root={small_data_root}", *SMALL_DATA,
                 f"data.samples_per_step={per_step}", "data.record_keys=true", "data.max_tokens_per_batch=400"]
    summary = train(compose_config(overrides, run_dir=tmp_path))
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    records = consumed(tmp_path)
    assert [len(r["keys"]) for r in records] == [per_step, per_step]  # one bundle per step, the whole global batch
    assert len({k for r in records for k in r["keys"]}) == 2 * per_step


def _two_process_run(root, data_root, strategy: str):
    run_dir = root / "run"
    overrides = [
        *train_overrides(data_root, "onevision", 2, run_dir), "experiment=ov_qwen2_0_5b/onevision", *TINY,
        f"data.root={data_root}", f"strategy={strategy}", "trainer.devices=2", "data.samples_per_step=8",
        "data.record_keys=true", "data.max_tokens_per_batch=170", "export=false",
    ]
    run_train(overrides, run_dir, root / "probe")
    return run_dir, torch.load(root / "probe" / "weights_rank0.pt")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, small_data_root):
    return _two_process_run(tmp_path_factory.mktemp("ddp"), small_data_root, "ddp")


def test_two_ddp_processes_split_the_global_batch_and_step_together(ddp_run):
    run_dir, _ = ddp_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    records = consumed(run_dir)
    assert sorted((r["rank"], r["step"], len(r["keys"])) for r in records) == [(0, 1, 4), (0, 2, 4), (1, 1, 4), (1, 2, 4)]
    for step in (1, 2):
        mine, theirs = (r for r in records if r["step"] == step)
        assert not set(mine["keys"]) & set(theirs["keys"])  # each rank its own half of the step's 8 samples
        assert sum(mine["micro_batches"]) == sum(theirs["micro_batches"]) == 4
    # Token-budget micro-batches: their number varies (the rank with fewer repeats its last one, weighted 0).
    assert len({len(r["micro_batches"]) for r in records}) > 1


@pytest.mark.deepspeed_ops(SHM)
def test_deepspeed_accumulates_the_step_bundles_as_ddp_does(ddp_run, tmp_path, small_data_root):
    """ZeRO-3 (the public scripts' engine) on the same data: every micro-batch's gradient partitions add up, only
    the last backward of a step ends DeepSpeed's accumulation, so the weights after 2 steps are DDP's (to the
    1e-5 that ZeRO-3 and DDP differ by without accumulation; overwritten partitions differed by 4e-3)."""
    _, ddp_weights = ddp_run
    run_dir, weights = _two_process_run(tmp_path, small_data_root, "deepspeed_zero3")
    by_rank_and_step = lambda records: sorted(records, key=lambda r: (r["rank"], r["step"]))  # noqa: E731
    assert by_rank_and_step(consumed(run_dir)) == by_rank_and_step(consumed(ddp_run[0]))
    assert weights.keys() == ddp_weights.keys()
    apart = [k for k in weights if not torch.allclose(weights[k], ddp_weights[k], atol=1e-4, rtol=0)]
    assert not apart, apart[:5]


def test_fsdp2_step_bundles_equal_ddp(ddp_run, tmp_path, small_data_root):
    """FSDP2 on the same data: each micro-batch's forward gathers the root's weights again, gradients are reduced in
    the step's last backward only (set_requires_gradient_sync), the held-out batches are evened out across ranks, so
    the run ends (no hang after the last step) with DDP's weights, from the shards of both ranks."""
    from tests.integration.test_checkpoints import trained_weights

    ddp_dir, ddp_weights = ddp_run
    run_dir, _ = _two_process_run(tmp_path, small_data_root, "fsdp2")
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] is not None  # validated at the end
    by_rank_and_step = lambda records: sorted(records, key=lambda r: (r["rank"], r["step"]))  # noqa: E731
    assert by_rank_and_step(consumed(run_dir)) == by_rank_and_step(consumed(ddp_dir))
    weights = trained_weights(tmp_path / "probe")
    assert weights.keys() == ddp_weights.keys()
    apart = [k for k in weights if not torch.allclose(weights[k], ddp_weights[k], atol=1e-5, rtol=0)]
    assert not apart, apart[:5]


def test_step_bundles_resume_exactly(tmp_path, small_data_root):
    """3 steps straight equal 1 step, stop, resume to 3: the same bundles, bit-identical weights and Adam state
    (the scheduler and optimizer stepped by hand under manual optimization)."""
    overrides = [
        "stage=pretrain", f"data.root={small_data_root}", *SMALL_DATA, "export=false", "trainer.max_steps=3",
        "+trainer.limit_val_batches=0", "data.samples_per_step=4", "data.max_tokens_per_batch=50",
        "stage.loss_weighting=sample", "data.record_keys=true", "data.shuffle_buffer=16",
    ]
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    train(compose_config(overrides, run_dir=straight))
    train(compose_config([*overrides, "+trainer.limit_train_batches=1", "+trainer.max_epochs=1"], run_dir=first))
    train(compose_config([*overrides, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}"], run_dir=resumed))
    assert consumed(straight) == consumed(first) + consumed(resumed)
    assert [r["step"] for r in consumed(resumed)] == [2, 3]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (straight, resumed))
    assert a["global_step"] == b["global_step"] == 3
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    (state_a,), (state_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, tensors in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][index][k]) for k, v in tensors.items())
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert any(len(r["micro_batches"]) > 1 for r in consumed(straight))  # steps of several micro-batches
