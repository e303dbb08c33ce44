"""strategy.sequence_parallel from the config (config/parallel.py): refused by key where the world, the heads, the
engine or the attention cannot take it; the plan's data-parallel share; one data stream per sequence-parallel group;
and the planner's rank share of a group's step (planner/workload.py) with the degree search."""
from __future__ import annotations

import pytest
import torch

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.data.stream import reader_slot
from ov_train.planner.workload import ONEVISION_MIX, fill, rank_share
from ov_train.strategies import SequenceParallelSetup, strategy_callbacks
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.tokens import video_tokens
from tests.conftest import compose_config, plan_of

REAL = VisionGeometry(image_size=384, patch_size=14, grid_pinpoints=default_pinpoints(384))
CPU4 = ["trainer.accelerator=cpu", "trainer.devices=4"]


def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        resolve_plan(compose_config(overrides))
    return str(err.value)


def test_a_degree_the_heads_or_the_world_cannot_take_is_refused_by_key():
    # Qwen2-7B: 28 query heads, 4 key/value heads.
    text = _problems(["model=ov_qwen2_7b", "strategy=fsdp2", "strategy.sequence_parallel=8", "trainer.accelerator=cpu",
                      "trainer.devices=8"])
    assert "strategy.sequence_parallel=8: the LLM's 28 query / 4 key-value heads split only by [1, 2, 4, 28]" in text
    text = _problems(["strategy=ddp", "strategy.sequence_parallel=4", "trainer.accelerator=cpu", "trainer.devices=6"])
    assert "strategy.sequence_parallel=4 does not divide the 6 processes" in text
    assert "strategy.sequence_parallel=0 must be an integer >= 1" in _problems(["strategy.sequence_parallel=0"])


def test_an_engine_left_to_lightning_is_refused_by_key():
    text = _problems(["strategy=auto", "strategy.sequence_parallel=2", *CPU4])
    assert "strategy.sequence_parallel=2 runs under strategy=ddp, fsdp2 or deepspeed_zero2/3" in text
    for engine in ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"):
        assert plan_of([f"strategy={engine}", "strategy.sequence_parallel=2", *CPU4]).strategy.sequence_parallel == 2


def test_attention_without_a_row_form_is_refused():
    text = _problems(["strategy=ddp", "strategy.sequence_parallel=2", "model.attn_implementation=flex_attention", *CPU4])
    assert "model.attn_implementation=flex_attention" in text and "strategy.sequence_parallel=2" in text


def test_generation_at_validation_is_refused():
    text = _problems(["strategy=ddp", "strategy.sequence_parallel=2", "eval.generate=true", *CPU4])
    assert "strategy.sequence_parallel=2 with eval.generate=true" in text


def test_the_plan_splits_the_world_into_groups_that_share_their_data():
    plan = plan_of(["strategy=ddp", "strategy.sequence_parallel=2", "data.samples_per_step=8", *CPU4])
    assert plan.strategy.sequence_parallel == 2 and plan.data.replicas == 2
    assert plan.data.samples_per_rank == 4  # 8 samples over 2 data-parallel groups
    assert "sequence_parallel" not in plan.strategy.settings  # not a Lightning strategy argument
    assert [type(c) for c in strategy_callbacks(plan.strategy)] == [SequenceParallelSetup]
    assert strategy_callbacks(plan_of(["strategy=ddp", *CPU4]).strategy) == []
    text = _problems(["strategy=ddp", "strategy.sequence_parallel=2", "data.samples_per_step=3", *CPU4])
    assert "data.samples_per_step=3 does not divide over 2 data-parallel groups" in text


def test_a_groups_ranks_read_one_stream(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    slots = {}
    for rank in range(4):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        slots[rank] = (reader_slot(replicas=2), reader_slot(), reader_slot(offset=1, replicas=4))
    assert [slots[r][0] for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]  # consecutive ranks: one group
    assert [slots[r][1] for r in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert {slots[r][2] for r in range(4)} == {(0, 1)}


def test_rank_share_holds_a_quarter_of_the_frames_and_tokens():
    samples = fill(131072, {"video": 1.0}, REAL, max_frames=128, anyres=True, pool=3, layout="grid")
    assert samples[0].crops == (128,) and samples[0].visual == (video_tokens(128, REAL, True, 3, "grid"),) == (11520,)
    share = rank_share(samples, 4, REAL)
    assert len(share) == len(samples)
    assert sum(sum(s.crops) for s in share) == sum(-(-sum(s.crops) // 4) for s in samples)
    assert share[0].crops == (32,) and share[0].visual == (32 * 90,) and share[0].pool == 3
    total, shared = sum(s.tokens for s in samples), sum(s.tokens for s in share)
    assert total / 4 <= shared <= total / 4 + 4 * len(samples)  # a shard of the row, rounded up per sample
    # images are not cut: every 4th image sample is this rank's
    mixed = fill(32768, ONEVISION_MIX, REAL, max_frames=32, anyres=True)
    images = [s for s in mixed if s.modality in ("single_image", "multi_image")]
    mine = [s for s in rank_share(mixed, 4, REAL) if s.modality in ("single_image", "multi_image")]
    assert mine == images[::4]
    assert rank_share(mixed, 1, REAL) == mixed


def test_the_long_video_experiments_resolve(tmp_path, monkeypatch):
    twin = plan_of(["experiment=tiny_long_video"])
    assert (twin.strategy.name, twin.strategy.world_size, twin.strategy.sequence_parallel) == ("fsdp2", 4, 2)
    video = twin.data.samples.media.video
    assert (video.max_frames, video.sampling, video.pool, video.newline) == (128, "uniform", 3, "grid")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/ov_qwen2_7b/onevision/export").mkdir(parents=True)
    (tmp_path / "runs/ov_qwen2_7b/onevision/export/config.json").write_text("{}")
    plan = resolve_plan(compose_config(["experiment=ov_qwen2_7b/long_video", f"data.root={tmp_path}"]))
    assert (plan.strategy.name, plan.strategy.world_size, plan.strategy.sequence_parallel) == ("fsdp2", 8, 4)
    assert plan.data.replicas == 4 and plan.data.budget.max_tokens == 131072
    video = plan.data.samples.media.video
    assert (video.max_frames, video.pool, video.newline) == (128, 3, "grid")
