"""The experiment and debug groups: every file composes into a plan; the tiny stage chain and the debug overlays run."""
from __future__ import annotations

import csv
import json

import pytest

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.run import train
from tests.conftest import CONF, SMALL_DATA, compose_config

EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
REAL = [e for e in EXPERIMENTS if e.startswith("ov_qwen2_0_5b/")]
CHAIN = ["pretrain", "mid", "final_image", "onevision"]


def test_the_experiments_ship():
    assert [f"ov_qwen2_0_5b/{s}" for s in sorted(CHAIN)] == REAL
    assert sorted(e for e in EXPERIMENTS if e not in REAL) == [f"tiny_stages/{s}" for s in sorted(CHAIN)]


@pytest.mark.parametrize("stage", CHAIN)
def test_the_0_5b_experiments_state_the_recipe_and_ask_only_for_weights_and_data(stage, tmp_path, monkeypatch):
    """Each stage file states the recipe's settings; what it leaves to the user is named when missing, and once given
    the only problem on this CPU machine is DeepSpeed's need for GPUs."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([f"experiment=ov_qwen2_0_5b/{stage}"])
    assert (cfg.stage.name, cfg.model.name, cfg.data.name) == (stage, "ov_qwen2_0_5b", "recipe")
    assert cfg.trainer.devices * cfg.data.batch_size == 256  # the recipe's global batch
    assert cfg.trainer.max_steps == {"pretrain": 2180, "mid": 18360, "final_image": 12500, "onevision": 6250}[stage]
    with pytest.raises(ConfigError, match="data.root is required"):
        resolve_plan(cfg)
    given = [f"data.root={tmp_path}"]
    if stage == "pretrain":
        (tmp_path / "siglip").mkdir(), (tmp_path / "qwen").mkdir()
        given += [f"model.vision_tower={tmp_path / 'siglip'}", f"model.llm={tmp_path / 'qwen'}"]
    else:
        previous = CHAIN[CHAIN.index(stage) - 1]
        assert cfg.model.init_from == f"runs/ov_qwen2_0_5b/{previous}/export"
        with pytest.raises(ConfigError, match=f"model.init_from='runs/ov_qwen2_0_5b/{previous}/export': path does not"):
            resolve_plan(compose_config([f"experiment=ov_qwen2_0_5b/{stage}", *given]))
        (tmp_path / cfg.model.init_from).mkdir(parents=True)
        (tmp_path / cfg.model.init_from / "config.json").write_text("{}")
    cfg = compose_config([f"experiment=ov_qwen2_0_5b/{stage}", *given])
    try:
        plan = resolve_plan(cfg)
    except ConfigError as err:
        assert str(err).splitlines()[1:] == ["  strategy=deepspeed needs CUDA GPUs: Lightning's DeepSpeedStrategy refuses"
                                             " other accelerators; use ddp or fsdp2 on CPU"]
    else:
        assert plan.strategy.name == "deepspeed" and plan.model.route == ("compose" if stage == "pretrain" else "export")


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
    for stage in CHAIN:
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
