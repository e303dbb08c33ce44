"""Short end-to-end runs of train(cfg): every stage, the run directory, the export, stage chaining."""
import json

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
)

from ov_train.config.media import MediaSettings
from ov_train.data.recipe import load_recipe
from ov_train.data.samples import SampleProcessor, collate, stock_inputs
from ov_train.data.stream import ValStream
from ov_train.model.forward import forward_logits
from ov_train.model.layout import part_of
from ov_train.run import train
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def run_stage(tmp_path, small_data_root, stage, *extra, steps=3):
    run_dir = tmp_path / stage
    overrides = [f"stage={stage}", f"trainer.max_steps={steps}", f"data.root={small_data_root}", *SMALL_DATA, *extra]
    summary = train(compose_config(overrides, run_dir=run_dir))
    return run_dir, summary


@pytest.fixture(scope="module")
def onevision_run(tmp_path_factory, small_data_root):
    return run_stage(tmp_path_factory.mktemp("runs"), small_data_root, "onevision", steps=4)


def test_run_directory_is_complete(onevision_run):
    run_dir, summary = onevision_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("val_accuracy", "chance_accuracy", "val_loss", "steps", "wall_time_s"):
        assert on_disk[key] is not None, key
    assert on_disk["steps"] == 4
    # 16 held-out samples for each of the three OneVision sources.
    assert on_disk["val_samples"] == 48
    assert set(on_disk["val_by_modality"]) >= {"accuracy_single_image", "accuracy_multi_image", "accuracy_video"}
    assert 0.25 < on_disk["chance_accuracy"] < 0.4


def _held_out_batch(model, tokenizer, root):
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", MediaSettings.of("anyres_max_9", 32), max_length=4096)
    examples = []
    for source in load_recipe("synthetic_onevision", root):
        examples += list(ValStream([source], process, limit=2))
    return collate(examples, tokenizer.pad_token_id)


def test_export_loads_in_stock_transformers_and_matches_the_checkpoint(onevision_run, small_data_root):
    run_dir, _ = onevision_run
    export = run_dir / "export"
    model, info = LlavaOnevisionForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    processor = LlavaOnevisionImageProcessorPil.from_pretrained(export)
    assert processor.size["height"] == model.config.vision_config.image_size

    # The weights Lightning trained (last.ckpt) give the same logits through our training forward
    # as the export does through the stock forward.
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    trained = LlavaOnevisionForConditionalGeneration(model.config)
    trained.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    batch = _held_out_batch(model, tokenizer, small_data_root)
    model.eval(), trained.eval()
    with torch.no_grad():
        ours = forward_logits(trained, batch)
        stock = model(**stock_inputs(batch)).logits
    valid = batch["attention_mask"].bool()
    assert torch.allclose(ours[valid], stock[valid], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stage", ["pretrain", "final_image"])
def test_other_stages_run(tmp_path, small_data_root, stage):
    run_dir, summary = run_stage(tmp_path, small_data_root, stage, steps=2)
    assert summary["steps"] == 2 and (run_dir / "export" / "config.json").is_file()


def test_pretrain_after_mid_changes_projector_only(tmp_path, small_data_root):
    mid_dir, _ = run_stage(tmp_path, small_data_root, "mid", steps=2)
    pre_dir, _ = run_stage(tmp_path, small_data_root, "pretrain", f"model.init_from={mid_dir / 'export'}", steps=3)
    before = LlavaOnevisionForConditionalGeneration.from_pretrained(mid_dir / "export").state_dict()
    after = LlavaOnevisionForConditionalGeneration.from_pretrained(pre_dir / "export").state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "pretrain changed nothing"
    assert {part_of(k) for k in changed} == {"projector"}
    projector = {k for k in before if part_of(k) == "projector"}
    # Stage 1 feeds squashed crops without the newline (stage.image_strategy=square), so the newline stays put.
    assert changed == projector - {"model.image_newline"}


def test_ov_export_rebuilds_the_run_export_from_the_checkpoint(onevision_run, tmp_path):
    from ov_train.cli.export import main

    run_dir, _ = onevision_run
    assert main([str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "out")]) == 0
    ours = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    run_export = LlavaOnevisionForConditionalGeneration.from_pretrained(run_dir / "export").state_dict()
    assert ours.keys() == run_export.keys()
    assert all(torch.equal(ours[k], run_export[k]) for k in ours)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_bf16_weights_train_validate_and_export(onevision_run, tmp_path, small_data_root):
    """trainer.precision=bf16-true (the one-GPU default) on CPU: bf16 weights, fp32 masters, and held-out metrics
    that are not themselves rounded to bf16 (chance equals the fp32 run's to the last bit)."""
    run_dir, summary = run_stage(tmp_path, small_data_root, "onevision", "trainer.precision=bf16-true", steps=2)
    assert summary["chance_accuracy"] == onevision_run[1]["chance_accuracy"]
    assert summary["val_samples"] == onevision_run[1]["val_samples"] and summary["val_loss"] < 7.0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.bfloat16}
    masters = {k: s["master"] for k, s in ckpt["optimizer_states"][0]["state"].items()}
    assert masters and {m.dtype for m in masters.values()} == {torch.float32}
    # The export holds the weights the model computed with (the bf16 ones), loadable by stock transformers.
    exported = LlavaOnevisionForConditionalGeneration.from_pretrained(run_dir / "export").state_dict()
    assert exported.keys() == {k.removeprefix("model.") for k in ckpt["state_dict"]}
    assert all(torch.equal(v.float(), ckpt["state_dict"][f"model.{k}"].float()) for k, v in exported.items())
