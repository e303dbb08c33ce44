"""Every shipped config composes; bad configs fail before any work with a message naming the key: unknown keys
and wrong types while Hydra composes (the schema), wrong values when the plan is resolved."""
import logging
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

from ov_train.checkpoints.paths import resume_targets
from ov_train.config.key_hints import unknown_key_hint
from ov_train.config.recipe import RecipeError
from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.data.recipe import load_recipe
from tests.conftest import CONF, compose_config

STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))

EXPECTED_PARTS = {
    "pretrain": {"projector": 1e-3},
    "mid": {"vision_tower": 2e-6, "projector": 1e-5, "llm": 1e-5},
    "final_image": {"vision_tower": 2e-6, "projector": 1e-5, "llm": 1e-5},
    "onevision": {"vision_tower": 2e-6, "projector": 1e-5, "llm": 1e-5},
    "dpo": {"vision_tower": 5e-7, "projector": 5e-7, "llm": 5e-7},  # LLaVA-NeXT scripts/train/dpo_ov7b.sh
}
# What the tiny model (the default) gets instead: model_stage/tiny_<stage>.yaml.
TINY_PARTS = {"dpo": {"vision_tower": 2e-6, "projector": 2e-6, "llm": 2e-6}}


def test_the_five_stages_ship():
    assert STAGES == ["dpo", "final_image", "mid", "onevision", "pretrain"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_composes_with_recipe_values(stage):
    cfg = compose_config([f"stage={stage}"], run_dir=Path("/tmp/x"))
    resolve_plan(cfg)
    assert dict(cfg.stage.parts) == TINY_PARTS.get(stage, EXPECTED_PARTS[stage])
    assert dict(compose_config([f"stage={stage}", "model=ov_qwen2_7b"]).stage.parts) == EXPECTED_PARTS[stage]
    assert cfg.stage.template == ("plain" if stage == "pretrain" else "qwen_1_5")
    # Stage 1 as the public code runs it (squashed crop, no newline); stage 1.5 on the paper's grid and limit.
    strategy = {"pretrain": "square", "mid": "anyres_max_4"}.get(stage, "anyres_max_9")
    assert cfg.stage.image_strategy == strategy
    assert cfg.stage.max_length == (8192 if stage == "pretrain" else 32768)
    assert cfg.data.recipe == f"synthetic_{stage}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("logger", LOGGERS)
def test_model_and_logger_options_compose(model, logger):
    cfg = compose_config([f"model={model}", f"logger={logger}", "model.random_init=true"], run_dir=Path("/tmp/x"))
    resolve_plan(cfg)
    assert cfg.model.name == model and cfg.logger.name == logger


def test_default_mix_is_the_onevision_ratio(small_data_root):
    sources = load_recipe("synthetic_onevision", small_data_root)
    weights = {s.modality: s.weight for s in sources}
    total = sum(weights.values())
    assert {k: round(100 * v / total, 1) for k, v in weights.items()} == {
        "single_image": 31.2,
        "multi_image": 43.0,
        "video": 25.9,
    }


def test_unknown_stage_is_named():
    with pytest.raises(MissingConfigException, match="stage/warmup"):
        compose_config(["stage=warmup"])


def _invalid(overrides, *fragments):
    cfg = compose_config(overrides, run_dir=Path("/tmp/x"))
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_learning_rate_for_a_missing_part():
    _invalid(["+stage.parts.audio_tower=1e-5"], "stage.parts.audio_tower", "allowed", "projector")


def test_missing_checkpoint_paths():
    _invalid(["model.pretrained=/nonexistent/ov"], "model.pretrained", "/nonexistent/ov", "does not exist")
    _invalid(["model.init_from=/nonexistent/export"], "model.init_from")
    # A typo'd relative path is a local path that does not exist, not a hub repo id (there is no hub here).
    _invalid(["model.vision_tower=google/siglip-typo", "model.llm=Qwen/Qwen2-typo"],
             "model.vision_tower='google/siglip-typo': path does not exist",
             "model.llm='Qwen/Qwen2-typo': path does not exist")
    _invalid(["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path")


def test_half_a_checkpoint_pair():
    _invalid(["model.vision_tower=/tmp"], "model.vision_tower and model.llm")


def test_real_geometry_without_weights():
    _invalid(["model=ov_qwen2_7b"], "model=ov_qwen2_7b", "model.pretrained=DIR")


def test_several_problems_reported_together():
    _invalid(
        ["stage.template=chatml", "stage.image_strategy=tiles", "data.batch_size=0", "trainer.max_steps=-1"],
        "stage.template='chatml'",
        "stage.image_strategy='tiles'",
        "data.batch_size=0",
        "trainer.max_steps=-1",
    )


def test_nothing_trainable():
    _invalid(["stage=pretrain", "stage.parts.projector=0"], "nothing would train")


def test_unknown_recipe():
    _invalid(["data.recipe=nope"], "data.recipe='nope'", "known recipes")


def test_recipe_errors_name_the_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {name: a, path: a, modality: audio, weight: -1, colour: red}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(bad), tmp_path)
    message = str(err.value)
    for fragment in ("sources[0]", "modality='audio'", "weight=-1", "colour", "no train-*.tar shards"):
        assert fragment in message


def test_train_fails_before_any_work(tmp_path):
    from ov_train.run import train

    cfg = compose_config(["model.pretrained=/nonexistent"], run_dir=tmp_path / "run")
    with open_dict(cfg):
        cfg.data.root = str(tmp_path / "never_created")
    with pytest.raises(ConfigError, match="model.pretrained"):
        train(cfg)
    assert not (tmp_path / "never_created").exists() and not (tmp_path / "run").exists()


def test_data_and_run_keys_are_checked():
    _invalid(
        ["nonfinite=ignore", "metrics.peak_tflops=0", "data.batch_size=null", "model.loss=fancy"],
        "nonfinite='ignore'",
        "metrics.peak_tflops=0",
        "data.batch_size and data.max_tokens_per_batch are both null",
        "model.loss='fancy'",
    )


@pytest.mark.parametrize("override, key, why", [
    ("trainer.max_step=2", "trainer.max_step", "Key 'max_step' not in 'TrainerConfig'"),
    ("strategy.stage=3", "strategy.stage", "Key 'stage' not in 'StrategyConfig'"),  # a DeepSpeed key under auto
    ("data.val_samples=all", "data.val_samples", "'all' of type 'str' could not be converted to Integer"),
    ("model.compile=sometimes", "model.compile", "'sometimes' is not a valid bool"),
])
def test_typos_and_wrong_types_fail_at_composition(override, key, why):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    message = f"{err.value}\n{err.value.__cause__}"
    assert key in message and why in message, message


@pytest.mark.parametrize("override, hint", [
    ("trainer.max_step=2", "trainer.max_step: no such key; did you mean trainer.max_steps? keys of trainer: accelerator"),
    ("data.io.retry=2", "data.io.retry: no such key; did you mean data.io.retries? keys of data.io: backoff_s, retries,"),
    ("seeed=1", "seeed: no such key; did you mean seed? keys of the config:"),
])
def test_a_mistyped_key_gets_the_keys_it_may_have_meant(override, hint):
    assert unknown_key_hint(["stage=mid", "+trainer.deterministic=true", override]).startswith(hint)
    # Keys the schema holds (an option's own, as strategy.stage is DeepSpeed's) and groups get none.
    assert unknown_key_hint(["trainer.max_steps=2", "strategy.stage=3", "stage=nope", "stage.parts.llm=1"]) is None


def test_other_lightning_trainer_arguments_pass_with_a_plus():
    plan = resolve_plan(compose_config(["+trainer.deterministic=true"], run_dir=Path("/tmp/x")))
    assert plan.trainer["deterministic"] is True
    _invalid(["+trainer.max_step=2"], "trainer.max_step: not a Lightning Trainer argument; did you mean trainer.max_steps")
    # Elsewhere `+` adds nothing the schema lacks.
    _invalid(["+data.synthetic.colour=red"], "data.synthetic.colour: no such setting; allowed: ['train_per_subset'")


def test_real_data_needs_a_root():
    _invalid(["data=recipe"], "data.root is required")


def test_a_recipe_of_absolute_sources_needs_no_root(tmp_path):
    """data.root is where relative source paths start: a recipe whose every path (and val) is absolute or a URL
    was refused for lacking it. Now only a relative path asks for it, and the message names the first one."""
    recipe = tmp_path / "mine.yaml"
    sources = (f"sources:\n  - {{name: a, path: {tmp_path}/a, modality: text, weight: 1}}\n"
               "  - {name: b, path: 'https://example.com/b', val: 's3://bucket/b-val', modality: text, weight: 1}\n")
    recipe.write_text(sources)
    plan = resolve_plan(compose_config(["data=recipe", f"data.recipe={recipe}"], run_dir=tmp_path / "run"))
    assert plan.data.config.root is None and [s.path for s in plan.data.recipe.sources] == [f"{tmp_path}/a", "https://example.com/b"]
    assert [s.name for s in load_recipe(str(recipe), None, require_shards=False)] == ["a", "b"]  # ov-eval's route
    recipe.write_text(sources + "  - {name: c, path: /abs/c, val: c/val, modality: text, weight: 1}\n"
                                "  - {name: d, path: d/shards, modality: text, weight: 1}\n")
    _invalid(["data=recipe", f"data.recipe={recipe}"], "data.root is required: mine.yaml: sources[2] (c) has the relative"
             " val='c/val'; set data.root=DIR or URL")
    with pytest.raises(RecipeError, match=r"--root is required: mine.yaml: sources\[2\] \(c\)"):
        load_recipe(str(recipe), None, root_key="--root")
    assert resolve_plan(compose_config(["data=recipe", f"data.recipe={recipe}", "data.root=/data"])).data.config.root == "/data"


def test_ckpt_path_auto_starts_fresh_then_resumes(tmp_path, caplog):
    # Fresh, and said so: `ckpt_path=auto` in another run directory (the default one is timestamped) finds nothing.
    with caplog.at_level(logging.INFO, logger="ov_train.checkpoints.paths"):
        assert resume_targets("auto", tmp_path) == ()
    assert f"ckpt_path=auto: no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}, starting fresh" in caplog.text
    assert "hydra.run.dir" in caplog.text
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_targets("auto", tmp_path) == (str(tmp_path / "checkpoints" / "last.ckpt"),)
    resumed = resolve_plan(compose_config(["ckpt_path=auto"], run_dir=tmp_path)).ckpt_path
    assert resumed == str(tmp_path / "checkpoints" / "last.ckpt")


def test_precision_and_compile_combinations_are_checked():
    _invalid(["trainer.precision=16-true"], "trainer.precision=16-true", "loss scaling", "bf16-true")
    _invalid(
        ["strategy=fsdp2", "trainer.devices=2", "trainer.precision=bf16-true"],
        "trainer.precision=bf16-true with strategy=fsdp2", "bf16-mixed",
    )
    _invalid(["model.attn_implementation=ov_varlen", "trainer.precision=32-true"],
             "model.attn_implementation=ov_varlen runs in bf16/fp16 only")
    _invalid(["strategy=deepspeed_zero3", "model.compile=true"], "model.compile=true with ZeRO-3")
    resolve_plan(compose_config(["model.compile=true", "trainer.precision=bf16-true"], run_dir=Path("/tmp/x")))


@pytest.fixture
def train_without_work(monkeypatch):
    """train() whose model building and synthetic generation fail the test if they are reached."""
    from ov_train import run

    def reached(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(run, "build_for_training", reached)
    monkeypatch.setattr(run, "prepare_data", reached)
    return run.train


def inf_weight_recipe(tmp_path, root):
    recipe = tmp_path / "inf.yaml"
    recipe.write_text(
        "sources:\n"
        "  - {name: images, path: single_image, modality: single_image, weight: 1}\n"
        "  - {name: videos, path: video, modality: video, weight: .inf}\n"
    )
    return [f"data.recipe={recipe}", f"data.root={root}"]


BAD_DATA = {
    # Each used to pass validation and fail only after the model was built (or never, for the stream).
    "missing source": (lambda tmp, root: ["data=recipe", "stage=final_image", f"data.root={tmp}"],
                       ["data.recipe=final_image", "sources[0] (general): no train-*.tar shards under", "sources[4]"]),
    "workers": (lambda tmp, root: ["data.num_workers=-1"], ["data.num_workers=-1 must be an integer >= 0"]),
    "inf weight": (inf_weight_recipe, ["sources[1]: weight=inf must be a positive, finite number"]),
    "shuffle": (lambda tmp, root: ["data.shuffle_buffer=0"], ["data.shuffle_buffer=0 must be an integer >= 1"]),
    "val samples": (lambda tmp, root: ["data.val_samples=0"], ["data.val_samples=0 must be an integer >= 1 or null"]),
    "skip limit": (lambda tmp, root: ["data.max_skips_in_a_row=0"], ["data.max_skips_in_a_row=0 must be an integer >= 1"]),
    "synthetic": (lambda tmp, root: ["data.synthetic.image_px=4", "data.synthetic.val_per_subset=0", "seed=-1"],
                  ["data.synthetic.image_px=4 must be an integer >= 16", "data.synthetic.val_per_subset=0", "seed=-1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_configs_stop_train_before_any_work(tmp_path, small_data_root, train_without_work, case):
    overrides, fragments = BAD_DATA[case]
    cfg = compose_config(overrides(tmp_path, small_data_root), run_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train_without_work(cfg)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert not (tmp_path / "run").exists()


def test_a_synthetic_root_holding_other_settings_is_named(tmp_path, small_data_root, train_without_work):
    # small_data_root holds 64 / 16 samples per subset; the shipped settings are 2000 / 200.
    cfg = compose_config([f"data.root={small_data_root}"], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.root='.*': .* holds synthetic data of other settings .*data.root=null"):
        train_without_work(cfg)
    # Left to the cache (data.root=null), the same settings validate: they get a directory of their own.
    resolve_plan(compose_config([], run_dir=tmp_path / "run"))


BAD_TRAINER = {
    # Each used to pass the checks and fail only after the data and the model were built (ZeroDivisionError,
    # Lightning's own ValueError), or to train wrongly: a negative clip value flips every gradient's sign.
    "trainer.precision=bf17": "trainer.precision='bf17'; allowed:",
    "trainer.devices=0": "trainer.devices=0 must",
    "trainer.devices=abc": "trainer.devices='abc' must",
    "trainer.num_nodes=0": "trainer.num_nodes=0 must be an integer >= 1",
    "trainer.accumulate_grad_batches=0": "trainer.accumulate_grad_batches=0: must be 1; a larger optimizer step is",
    "trainer.log_every_n_steps=0": "trainer.log_every_n_steps=0 must be an integer >= 1",
    "trainer.val_check_interval=0": "trainer.val_check_interval=0 must be",
    "trainer.val_check_interval=0.5": "trainer.val_check_interval=0.5 must be",  # Lightning: no epochs, no fraction
    "trainer.val_check_interval=1:00": "trainer.val_check_interval='1:00' must be",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val=-1.0 must be",
    # The model's geometry and the prediction table: they used to fail inside the model's build or forward
    # ("The size of tensor a (5) must match the size of tensor b (4)"), or train with a negative table size.
    "model.text.num_attention_heads=5": "model.text.num_attention_heads=5 must divide model.text.hidden_size=192",
    "model.text.num_key_value_heads=3": "model.text.num_key_value_heads=3 must divide model.text.num_attention_heads=4",
    "model.vision.hidden_size=-1": "model.vision.hidden_size=-1 must be an integer >= 1",
    "metrics.predictions=-1": "metrics.predictions=-1 must be an integer >= 0",
    "eval.max_new_tokens=0": "eval.max_new_tokens=0 must be an integer >= 1",
}


@pytest.mark.parametrize("override", sorted(BAD_TRAINER))
def test_bad_trainer_values_stop_train_before_any_work(tmp_path, train_without_work, override):
    cfg = compose_config([override], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train_without_work(cfg)
    assert BAD_TRAINER[override] in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_trainer_values_lightning_accepts_pass():
    for overrides in (["trainer.precision=bf16-mixed"], ["trainer.precision=32"], ["trainer.devices=auto"],
                      ["trainer.val_check_interval=5"], ["trainer.val_check_interval=00:00:10:00"],
                      ["trainer.gradient_clip_val=null"], ["trainer.accelerator=cpu", "trainer.devices=[0]"]):
        resolve_plan(compose_config(overrides, run_dir=Path("/tmp/x")))
