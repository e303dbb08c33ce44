"""stage=dpo as a plan: the public DPO script's settings, stage.preference.* checked by key, the reference each run
gets, synthetic preference pairs from the synthetic SFT samples, pair batches that count both rows."""
from __future__ import annotations

import json

import pytest

from ov_train.config.media import MediaSettings
from ov_train.config.options import TokenBudget
from ov_train.config.run_plan import ConfigError
from ov_train.data.batching import fill_batches
from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.data.samples import SampleProcessor
from ov_train.data.synthetic import make_sample, synthetic_rejected
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import compose_config, plan_of

ADAPTERS_ONLY = ["adapter=lora", "adapter.targets.projector=frozen"]


def test_dpo_stage_states_llava_nexts_dpo_script():
    """scripts/train/dpo_ov7b.sh: --learning_rate 5e-7 for every tunable part, --warmup_ratio 0.1, --weight_decay 0,
    --beta 0.1, --gamma 0 (plain sigmoid), anyres_max_9, --model_max_length 32768: what a real model gets."""
    cfg = compose_config(["stage=dpo", "model=ov_qwen2_7b"])
    assert dict(cfg.stage.parts) == {"vision_tower": 5e-7, "projector": 5e-7, "llm": 5e-7} and cfg.model.lr_scale == 1.0
    assert (cfg.stage.warmup_ratio, cfg.stage.weight_decay, cfg.stage.preference.warm_start_steps) == (0.1, 0.0, 0)
    assert cfg.trainer.max_steps == compose_config(["stage=onevision", "model=ov_qwen2_7b"]).trainer.max_steps
    plan = plan_of(["stage=dpo"], run_dir="/tmp/x")
    settings = plan.preference
    assert (settings.loss, settings.beta, settings.label_smoothing) == ("sigmoid", 0.1, 0.0)
    assert plan.data.pairs and plan.data.recipe.name == "synthetic_dpo"
    assert (plan.data.samples.media.image.strategy, plan.data.samples.max_length) == ("anyres_max_9", 32768)
    assert (plan.optim.warmup_ratio, plan.optim.weight_decay) == (0.1, 0.0)
    # Conversation stages have no preference objective.
    assert plan_of(["stage=onevision"], run_dir="/tmp/x").preference is None


def test_the_embedded_default_gets_the_tiny_models_dpo_settings():
    """model_stage/tiny_dpo.yaml: the tiny model from random weights warms up, then trains at 2e-4 for 100 steps;
    the command line and experiments still override it, and no other model or stage reads it."""
    plan = plan_of(["stage=dpo"], run_dir="/tmp/x")
    assert plan.optim.part_lrs == pytest.approx({"vision_tower": 2e-4, "projector": 2e-4, "llm": 2e-4})
    assert (plan.trainer["max_steps"], plan.preference.warm_start_steps) == (100, 500)
    assert plan_of(["stage=dpo", "trainer.max_steps=7", "stage.parts.llm=1e-6"], run_dir="/tmp/x").trainer["max_steps"] == 7
    assert compose_config(["experiment=tiny_stages/dpo"]).trainer.max_steps == 200
    assert compose_config(["stage=dpo", "stage.parts.llm=1e-6"]).stage.parts.llm == 1e-6
    assert compose_config(["stage=onevision"]).trainer.max_steps == 750


@pytest.mark.parametrize("overrides, reference", [
    ([], "frozen"),
    (["adapter=lora"], "frozen"),  # the projector trains whole beside the adapters: switching them off is not the start
    (ADAPTERS_ONLY, "adapters_off"),
    (["stage.preference.reference=precomputed"], "precomputed"),
    ([*ADAPTERS_ONLY, "stage.preference.reference=frozen"], "frozen"),
])
def test_the_reference_each_run_gets(overrides, reference):
    assert plan_of(["stage=dpo", *overrides], run_dir="/tmp/x").preference.reference == reference


@pytest.mark.parametrize("overrides, message", [
    (["stage.preference.reference=copy"],
     "stage.preference.reference='copy'; allowed: ['auto', 'adapters_off', 'frozen', 'precomputed']"),
    (["stage.preference.reference=adapters_off"], "stage.preference.reference=adapters_off needs adapters on every "
                                                  "trained part, but adapter=none"),
    (["stage.preference.reference=adapters_off", "adapter=lora"], "a part trains whole beside the adapters"),
    (["stage.preference.beta=-1"], "stage.preference.beta=-1.0 must be positive"),
    (["stage.preference.warm_start_stage=dpo"], "stage.preference.warm_start_stage='dpo'; allowed: ["),
    (["stage.preference.warm_start_steps=-2"], "stage.preference.warm_start_steps=-2 must be >= 0"),
    (["data.samples_per_step=8", "stage.loss_weighting=token"], "stage.loss_weighting='token' with stage.preference"),
])
def test_bad_preference_settings_are_named_by_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        plan_of(["stage=dpo", *overrides], run_dir="/tmp/x")
    assert message in str(err.value)


def test_a_warm_start_only_from_random_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert plan_of(["stage=dpo", f"model.init_from={tmp_path}"], run_dir="/tmp/x").preference.warm_start_steps == 0
    assert plan_of(["stage=dpo", "stage.preference.warm_start_steps=0"], run_dir="/tmp/x").preference.warm_start_steps == 0


@pytest.mark.parametrize("subset", ["single_image", "multi_image", "video", "text", "caption"])
def test_synthetic_pairs_reject_a_plausible_wrong_answer(subset):
    for index in range(12):
        meta = make_sample(subset, "train", index)["json"]
        rejected = synthetic_rejected(meta)
        assert rejected != meta["answer"] and rejected in meta["options"]  # another option of the same task
        assert synthetic_rejected(json.loads(json.dumps(meta))) == rejected  # the same pair at every read


def _raw(sample: dict) -> dict:
    return {**sample, "json": json.dumps(sample["json"]).encode()}


def test_synthetic_samples_become_pairs_and_batches_count_both_rows(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    process = SampleProcessor(tokenizer, VisionGeometry.from_model_config(model.config), "qwen_1_5",
                              MediaSettings.of("anyres_max_9", 8), max_length=4096)
    pairs = PairProcessor(process, synthetic_rejected)
    examples = [pairs({**_raw(make_sample("single_image", "train", i)), "__source__": "s"}) for i in range(4)]
    for e, i in zip(examples, range(4)):
        meta = make_sample("single_image", "train", i)["json"]
        chosen = tokenizer.decode(e["labels"][e["labels"] >= 0])
        rejected = tokenizer.decode(e["rejected_labels"][e["rejected_labels"] >= 0])
        assert chosen.startswith(meta["answer"]) and rejected.startswith(synthetic_rejected(meta))
        assert e["cost"] == 2 * max(len(e["input_ids"]), len(e["rejected_input_ids"]))
    # A budget of two pairs' rows holds two pairs, not four sequences' worth of pairs.
    budget = TokenBudget(max_tokens=max(e["cost"] for e in examples) * 2, max_samples=None)
    sizes = [len(b) for b, _ in fill_batches(iter(examples), budget)]
    assert sum(sizes) == 4 and max(sizes) <= 2
    batch = collate_pairs(examples, tokenizer.pad_token_id)
    assert batch["pairs"] == 4 and batch["input_ids"].shape[0] == 8
