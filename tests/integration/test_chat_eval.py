"""The default run's export, used as people use it: ov-eval agrees with validation, ov-chat answers as ov-eval
does, eval.generate fills the W&B table, the model card tells what the model is, lmms-eval loads it.

One short run trains the tiny model far enough that some held-out answers are right and some wrong."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ov_train.cli.chat import main as ov_chat
from ov_train.cli.eval import main as ov_eval
from ov_train.cli.export import main as ov_export
from ov_train.data.recipe import load_recipe
from ov_train.data.samples import VIDEO_FIELDS
from ov_train.data.stream import read_tar
from ov_train.eval.evaluate import read_rows
from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config
from tests.integration.test_dashboards import wandb_records

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

STEPS = 40
HELD_OUT = 16  # the small data's held-out samples per source; metrics.predictions=16 puts all of them in the table


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data_root):
    run_dir = tmp_path_factory.mktemp("chat_eval") / "run"
    overrides = [
        f"trainer.max_steps={STEPS}", f"data.root={small_data_root}", *SMALL_DATA, "logger=wandb",
        # A learning rate at which 40 steps learn some answers (not yet all).
        "model.lr_scale=1000", "stage.warmup_ratio=0", f"metrics.predictions={HELD_OUT}", "eval.generate=true",
    ]
    summary = train(compose_config(overrides, run_dir=run_dir))
    return run_dir, summary


@pytest.fixture(scope="module")
def evaluated(trained, small_data_root):
    run_dir, _ = trained
    out = run_dir / "eval"
    argv = [str(run_dir / "export"), "synthetic_onevision", "--root", str(small_data_root), "--out", str(out)]
    assert ov_eval([*argv, "--batch-size", "6", "--max-new-tokens", "8"]) == 0
    return out


def test_validation_reproduces_exactly_what_ov_eval_answers_right(trained, evaluated):
    run_dir, summary = trained
    validated = [json.loads(line) for line in (run_dir / "predictions" / f"step_{STEPS}.jsonl").read_text().splitlines()]
    evaluated_rows = read_rows(evaluated / "predictions.jsonl")
    # Both walk the held-out split in the same order: sources in recipe order, shards and samples in file order.
    assert len(validated) == len(evaluated_rows) == summary["val_samples"] == 3 * HELD_OUT
    assert [r["modality"] for r in validated] == [r["modality"] for r in evaluated_rows]
    assert [r["reference"] for r in validated] == [r["reference"] + "<|im_end|>" for r in evaluated_rows]
    correct = [r["correct"] for r in validated]
    assert 0 < sum(correct) < len(correct), "the run should answer some held-out samples right and some wrong"
    assert correct == [r["exact_match"] for r in evaluated_rows]
    # eval.generate ran the same generation at validation: the same replies.
    assert [r["generated"] for r in validated] == [r["prediction"] for r in evaluated_rows]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["exact_match"] == pytest.approx(summary["val_accuracy"])
    for modality in ("single_image", "multi_image", "video"):
        assert metrics["by_modality"][modality]["exact_match"] == pytest.approx(summary["val_by_modality"][f"accuracy_{modality}"])


def test_wandb_table_shows_the_generated_reply_and_the_image(trained):
    """W&B logs a table with media as a run artifact: the table (images as image-file references) and the PNGs."""
    run_dir, _ = trained
    artifacts = [r.artifact for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "artifact"]
    (files,) = [files for files in ({e.path: e.local_path for e in a.manifest.contents} for a in artifacts)
                if "val/predictions.table.json" in files]
    logged = json.loads(Path(files["val/predictions.table.json"]).read_text())
    assert logged["columns"] == ["step", "modality", "prompt", "reference", "prediction", "correct", "generated", "image"]
    assert len(logged["data"]) == 3 * HELD_OUT
    images = [row[-1] for row in logged["data"]]
    assert all(image["_type"] == "image-file" and image["width"] == image["height"] == 32 for image in images)
    assert {image["path"] for image in images} <= set(files)


def test_ov_chat_answers_a_held_out_question_as_ov_eval_does(trained, evaluated, small_data_root, tmp_path, capsys):
    run_dir, _ = trained
    rows = {r["key"]: r for r in read_rows(evaluated / "predictions.jsonl")}
    source = load_recipe("synthetic_onevision", small_data_root).sources[0]
    sample = next(read_tar(source.val_shards[0]))
    image = tmp_path / "image.png"
    image.write_bytes(sample["img0.png"])
    question = json.loads(sample["json"])["conversations"][0]["value"].removeprefix("<image>\n")
    capsys.readouterr()
    assert ov_chat([str(run_dir / "export"), "--image", str(image), question, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == rows[f"{source.name}/{sample['__key__']}"]["prediction"]
    for argv, message in [
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(run_dir / "summary.json")], "cannot read image"),
    ]:
        with pytest.raises(SystemExit):
            ov_chat([str(run_dir / "export"), *argv, "hi"])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ov_chat([str(run_dir), "hi"])
    assert "no config.json, so not a Hugging Face export" in capsys.readouterr().err


def test_model_card_tells_what_the_model_is(trained):
    run_dir, summary = trained
    card = (run_dir / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    for fact in ("| stage | `onevision` |", "| chat template | `qwen_1_5` |", "| recipe | `synthetic_onevision` |",
                 f"| optimizer steps | {STEPS} |", "| multi_image | 43.0% |", f"| `val/accuracy` | {summary['val_accuracy']:.4g} |"):
        assert fact in card
    assert f"ov-chat {run_dir / 'export'} --image" in card


def test_ov_export_writes_the_run_exports_template_ids_and_card(trained, tmp_path):
    run_dir, _ = trained
    assert ov_export([str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "export")]) == 0
    for name in ("chat_template.jinja", "generation_config.json", "config.json"):
        assert (tmp_path / "export" / name).read_text() == (run_dir / "export" / name).read_text()
    card = (tmp_path / "export" / "README.md").read_text()
    assert card == (run_dir / "export" / "README.md").read_text().replace(str(run_dir / "export"), str(tmp_path / "export"))


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install -e '.[eval]')")
def test_lmms_eval_scores_the_export_with_its_stock_onevision_class(trained, evaluated, small_data_root, tmp_path):
    """A local lmms-eval task over the held-out single images, run by lmms-eval's `llava_hf` model (stock
    AutoProcessor + LlavaOnevisionForConditionalGeneration): its replies and exact match equal ov-eval's."""
    run_dir, _ = trained
    source = load_recipe("synthetic_onevision", small_data_root).sources[0]
    task = tmp_path / "tasks"
    task.mkdir()
    docs = []
    for i, sample in enumerate(read_tar(source.val_shards[0])):
        Image.open(io.BytesIO(sample["img0.png"])).save(task / f"{i}.png")
        meta = json.loads(sample["json"])
        docs.append({"id": f"{source.name}/{sample['__key__']}", "image": str(task / f"{i}.png"),
                     "question": meta["conversations"][0]["value"].removeprefix("<image>\n"), "answer": meta["answer"]})
    (task / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task / "ov_local_utils.py").write_text(LMMS_UTILS)
    (task / "ov_local.yaml").write_text(LMMS_TASK.format(data=task / "docs.jsonl"))
    out = tmp_path / "lmms"
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_hf",
               "--model_args", f"pretrained={run_dir / 'export'},device=cpu,device_map=cpu,dtype=float32",
               "--tasks", "ov_local", "--include_path", str(task), "--batch_size", "1", "--output_path", str(out),
               "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    results = list(out.rglob("*_results.json"))  # lmms-eval exits 0 after an error too
    assert result.returncode == 0 and len(results) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    score = json.loads(results[0].read_text())["results"]["ov_local"]["exact_match,none"]
    ours = [r for r in read_rows(evaluated / "predictions.jsonl") if r["source"] == source.name]
    assert score == pytest.approx(sum(r["exact_match"] for r in ours) / len(ours))
    (samples,) = out.rglob("*_samples_ov_local.jsonl")
    replies = {}
    for doc in map(json.loads, samples.read_text().splitlines()):
        reply = doc["filtered_resps"]  # a string, or a list of one in older releases
        replies[doc["doc_id"]] = (reply[0] if isinstance(reply, list) else reply).strip()
    assert [replies[i] for i in range(len(ours))] == [r["prediction"] for r in ours]


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install -e '.[eval]')")
def test_lmms_eval_ov_train_model_scores_images_and_videos_as_ov_eval(trained, evaluated, small_data_root, tmp_path):
    """`--model ov_train` (registered through lmms-eval's entry points): on held-out single images and videos its
    replies and exact match equal ov-eval's; videos are sampled as the export's stage sampled them."""
    run_dir, _ = trained
    sources = {s.name: s for s in load_recipe("synthetic_onevision", small_data_root).sources}
    task = tmp_path / "tasks"
    task.mkdir()
    for name in ("single_image", "video"):
        docs = []
        for i, sample in enumerate(read_tar(sources[name].val_shards[0])):
            field = next(f for f in (*VIDEO_FIELDS, "img0.png") if f in sample)
            media = task / f"{name}_{i}.{field.split('.')[-1]}"
            media.write_bytes(sample[field])
            meta = json.loads(sample["json"])
            question = meta["conversations"][0]["value"].removeprefix("<image>\n").removeprefix("<video>\n")
            docs.append({"media": str(media), "question": question, "answer": meta["answer"]})
        (task / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (task / f"ov_{name}.yaml").write_text(LMMS_TASK.format(data=task / f"{name}.jsonl").replace(
            "task: ov_local", f"task: ov_{name}").replace("ov_local_utils.doc_to_visual", f"ov_local_utils.{name}_visual"))
    (task / "ov_local_utils.py").write_text(LMMS_UTILS + LMMS_MEDIA)
    out = tmp_path / "lmms"
    command = [sys.executable, "-m", "lmms_eval", "--model", "ov_train", "--model_args", f"pretrained={run_dir / 'export'}",
               "--tasks", "ov_single_image,ov_video", "--include_path", str(task), "--batch_size", "1",
               "--output_path", str(out), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    results = list(out.rglob("*_results.json"))
    assert result.returncode == 0 and len(results) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    scores = json.loads(results[0].read_text())["results"]
    rows = read_rows(evaluated / "predictions.jsonl")
    for name in ("single_image", "video"):
        ours = [r for r in rows if r["source"] == name]
        assert scores[f"ov_{name}"]["exact_match,none"] == pytest.approx(sum(r["exact_match"] for r in ours) / len(ours))
        (samples,) = out.rglob(f"*_samples_ov_{name}.jsonl")
        replies = {}
        for doc in map(json.loads, samples.read_text().splitlines()):
            reply = doc["filtered_resps"]
            replies[doc["doc_id"]] = (reply[0] if isinstance(reply, list) else reply).strip()
        assert [replies[i] for i in range(len(ours))] == [r["prediction"] for r in ours], name


LMMS_MEDIA = '''

def single_image_visual(doc):
    return [Image.open(doc["media"]).convert("RGB")]


def video_visual(doc):
    return [doc["media"]]
'''

LMMS_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''

LMMS_TASK = """task: ov_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function ov_local_utils.doc_to_visual
doc_to_text: !function ov_local_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""
