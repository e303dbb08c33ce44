"""The experiment and debug groups: every file composes into a plan; the tiny stage chain and the debug overlays run."""
from __future__ import annotations

import csv
import json

import pytest

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.run import train
from tests.conftest import CONF, SMALL_DATA, compose_config

EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
SIZES = ["ov_qwen2_0_5b", "ov_qwen2_7b", "ov_qwen2_72b"]
CHAIN = ["pretrain", "mid", "final_image", "onevision"]
# One pass (Table 1: Epoch 1) over each recipe's samples (ov_train/data_recipes/*.yaml, which cite their counts).
RECIPE_SAMPLES = {"pretrain": 558_000, "mid": 4_835_000, "final_image": 3_200_000, "onevision": 1_601_600}


def test_the_experiments_ship():
    chain = [f"{size}/{stage}" for size in [*SIZES, "tiny_stages"] for stage in CHAIN]
    # Long video (README): 7B on 8 GPUs and its tiny twin, tests/integration/test_long_video.py; preference (DPO).
    extra = ["ov_qwen2_7b/long_video", "tiny_long_video", "ov_qwen2_7b/dpo", "tiny_stages/dpo"]
    assert sorted([*chain, *extra]) == EXPERIMENTS


def test_the_7b_dpo_experiment_states_the_public_script_and_asks_for_steps_and_data(tmp_path, monkeypatch):
    """LLaVA-NeXT scripts/train/dpo_ov7b.sh: from the OneVision model, ZeRO-3, 1 pair x 8 accumulation x 8 GPUs, the
    stage's rates and beta; the data and so the length of one epoch are the user's."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["experiment=ov_qwen2_7b/dpo"])
    assert (cfg.stage.name, cfg.model.name, cfg.data.name, cfg.strategy.name) == ("dpo", "ov_qwen2_7b", "recipe", "deepspeed")
    assert (cfg.data.samples_per_step, cfg.model.init_from) == (64, "runs/ov_qwen2_7b/onevision/export")
    with pytest.raises(ConfigError, match="data.epochs needs sample counts: recipe 'dpo' gives weights"):
        resolve_plan(compose_config(["experiment=ov_qwen2_7b/dpo", f"data.root={tmp_path}"]))
    (tmp_path / cfg.model.init_from).mkdir(parents=True)
    (tmp_path / cfg.model.init_from / "config.json").write_text("{}")
    recipe = tmp_path / "pairs.yaml"  # two preference sources mixed by their pair counts
    recipe.write_text("sources:\n  - {name: a, path: a, modality: single_image, samples: 4000}\n"
                      "  - {name: b, path: b, modality: video, samples: 1760}\n")
    plan = resolve_plan(compose_config(["experiment=ov_qwen2_7b/dpo", f"data.root={tmp_path}", f"data.recipe={recipe}"]))
    assert plan.trainer["max_steps"] == 90  # one epoch: ceil(5760 / 64)
    assert plan.model.route == "export" and plan.strategy.settings["stage"] == 3
    assert plan.optim.part_lrs == {"vision_tower": 5e-7, "projector": 5e-7, "llm": 5e-7}
    assert (plan.optim.warmup_ratio, plan.preference.beta, plan.preference.loss) == (0.1, 0.1, "sigmoid")
    assert plan.preference.warm_start_steps == 0 and plan.data.samples_per_rank == 8


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", CHAIN)
def test_the_experiments_state_the_papers_recipe_and_ask_only_for_weights_and_data(size, stage, tmp_path, monkeypatch):
    """Each stage file states the paper's settings (shared/paper/*.yaml cites each number); what it leaves to the user is
    named when missing, and once given the plan resolves, its steps one pass over the recipe's samples."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([f"experiment={size}/{stage}"])
    assert (cfg.stage.name, cfg.model.name, cfg.data.name) == (stage, size, "recipe")
    # Table 1 and its caption: 512 for stage 1 and for the 0.5B model, 256 otherwise; one epoch.
    per_step = 512 if stage == "pretrain" or size == "ov_qwen2_0_5b" else 256
    assert (cfg.data.samples_per_step, cfg.data.epochs) == (per_step, 1)
    assert dict(cfg.stage.parts) == ({"projector": 1e-3} if stage == "pretrain" else
                                     {"vision_tower": 2e-6, "projector": 1e-5, "llm": 1e-5})
    assert cfg.stage.max_length == (8192 if stage == "pretrain" else 32768)
    assert cfg.stage.loss_weighting == ("token" if stage == "pretrain" else "sample")
    assert (cfg.stage.weight_decay, cfg.stage.warmup_ratio) == (0.0, 0.03)
    with pytest.raises(ConfigError, match="data.root is required"):
        resolve_plan(cfg)
    given = [f"data.root={tmp_path}"]
    if stage == "pretrain":
        (tmp_path / "siglip").mkdir(), (tmp_path / "qwen").mkdir()
        given += [f"model.vision_tower={tmp_path / 'siglip'}", f"model.llm={tmp_path / 'qwen'}"]
    else:
        previous = CHAIN[CHAIN.index(stage) - 1]
        assert cfg.model.init_from == f"runs/{size}/{previous}/export"
        with pytest.raises(ConfigError, match=f"model.init_from='runs/{size}/{previous}/export': path does not"):
            resolve_plan(compose_config([f"experiment={size}/{stage}", *given]))
        (tmp_path / cfg.model.init_from).mkdir(parents=True)
        (tmp_path / cfg.model.init_from / "config.json").write_text("{}")
    plan = resolve_plan(compose_config([f"experiment={size}/{stage}", *given]))
    assert plan.strategy.name == "deepspeed" and plan.model.route == ("compose" if stage == "pretrain" else "export")
    # Every public script runs ZeRO-3 (LLaVA-NeXT scripts/train/*.sh: --deepspeed scripts/zero3.json), 0.5B stage 1 too.
    assert plan.strategy.settings["stage"] == 3
    assert plan.trainer["max_steps"] == plan.optim.total_steps == -(-RECIPE_SAMPLES[stage] // per_step)
    assert plan.data.samples_per_rank == per_step // 8  # one node of 8 GPUs (trainer/gpu_node.yaml)


@pytest.mark.parametrize("debug", ["steps", "overfit", "profile"])
def test_debug_overlays_resolve(debug):
    plan = resolve_plan(compose_config([f"debug={debug}"], run_dir="/tmp/x"))
    assert plan.trainer["max_steps"] <= 100
    if debug == "steps":
        assert plan.trainer["detect_anomaly"] and plan.nonfinite == "stop" and plan.trainer["num_sanity_val_steps"] > 0


@pytest.mark.slow
def test_the_tiny_stage_chain_runs_one_step_per_stage(tmp_path, small_data_root, monkeypatch):
    """Each stage starts from the one before's export, as the files say (paths relative to where the run starts)."""
    monkeypatch.chdir(tmp_path)
    for stage in [*CHAIN, "dpo"]:
        overrides = [f"experiment=tiny_stages/{stage}", "trainer.max_steps=1", f"data.root={small_data_root}", *SMALL_DATA,
                     "trainer.limit_val_batches=1"]
        summary = train(compose_config(overrides, run_dir=f"runs/tiny_stages/{stage}"))
        assert summary["stage"] == stage and summary["steps"] == 1
        assert (tmp_path / "runs" / "tiny_stages" / stage / "export" / "config.json").is_file()


@pytest.mark.slow
def test_overfit_one_batch_trains_on_the_same_batch_until_its_loss_falls(tmp_path, small_data_root):
    run_dir = tmp_path / "overfit"
    overrides = ["debug=overfit", "trainer.max_steps=12", f"data.root={small_data_root}", *SMALL_DATA, "logger=csv",
                 "export=false"]
    train(compose_config(overrides, run_dir=run_dir))
    keys = [json.loads(line)["keys"] for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines()]
    assert len(keys) == 12 and all(k == keys[0] for k in keys)
    with open(next(run_dir.glob("csv/*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < 0.5 * losses[0], losses
