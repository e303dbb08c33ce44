"""ov-eval and ov-chat without training: metrics on hand-made predictions with known scores, the metric per
source, clear errors, resuming (a rerun generates only the samples predictions.jsonl lacks), a conversation that
keeps its first turn's media. The trained default run's export: tests/integration/test_chat_eval.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import time

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ov_train.checkpoints.export import export_pretrained
from ov_train.cli import chat as chat_module
from ov_train.cli.chat import main as ov_chat
from ov_train.cli.eval import main as ov_eval
from ov_train.eval import evaluate as evaluate_module
from ov_train.eval.evaluate import EvalSource, eval_sources, evaluate, read_rows, write_metrics
from ov_train.eval.inference import load_export
from ov_train.eval.metrics import score
from tests.helpers import noise_png

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize(
    "metric, prediction, reference, options, expected",
    [
        ("exact_match", "The Red.", "red", [], 1.0),  # case, punctuation and articles do not count
        ("exact_match", "a red circle", "red square", [], 0.0),
        ("multiple_choice", "B", "green", COLOURS, 1.0),  # the letter of the reference option
        ("multiple_choice", "(B) green", "B", COLOURS, 1.0),
        ("multiple_choice", "Green", "green", COLOURS, 1.0),  # the option text
        ("multiple_choice", "C. blue", "green", COLOURS, 0.0),
        ("multiple_choice", "A red one", "A", [], 0.0),  # an article is not the letter A
        ("multiple_choice", "A", "A", [], 1.0),
        ("anls", "hello world", "hello world", [], 1.0),
        ("anls", "helo world", "Hello World", [], 1 - 1 / 11),  # one edit in 11 characters
        ("anls", "hello", "hello world", [], 0.0),  # 6 edits in 11: past the 0.5 threshold
        ("relaxed_accuracy", "10.4", "10", [], 1.0),  # within 5%
        ("relaxed_accuracy", "10.6", "10", [], 0.0),
        ("relaxed_accuracy", "12%", "0.12", [], 1.0),
        ("relaxed_accuracy", "1,050", "1000", [], 1.0),
        ("relaxed_accuracy", "Paris", "paris", [], 1.0),  # not numbers: exact match
    ],
)
def test_metric_scores(metric, prediction, reference, options, expected):
    assert score(metric, prediction, reference, options) == pytest.approx(expected)


def row(i, source, modality, prediction, reference, metric="exact_match", options=()):
    return {"id": f"{source}/{i}", "source": source, "modality": modality, "prompt": "q", "reference": reference,
            "prediction": prediction, "options": list(options), "metric": metric}


def test_metrics_per_source_and_modality_from_predictions(tmp_path):
    rows = [
        row(0, "colours", "single_image", "red", "red", "multiple_choice", COLOURS),
        row(1, "colours", "single_image", "A", "red", "multiple_choice", COLOURS),  # right by letter, not by text
        row(2, "colours", "single_image", "blue", "red", "multiple_choice", COLOURS),
        row(3, "docs", "single_image", "helo world", "hello world", "anls"),
        row(4, "clips", "video", "left", "left"),
        row(5, "clips", "video", "up", "down"),
        row(6, "other", "text", "x", "x"),  # not part of this evaluation
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [EvalSource("colours", (), "multiple_choice"), EvalSource("docs", (), "anls"), EvalSource("clips", (), "exact_match")]
    metrics = write_metrics(tmp_path, sources, {r["id"] for r in rows[:6]})
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["samples"] == 6
    assert metrics["by_source"]["colours"] == {"samples": 3, "metric": "multiple_choice", "score": pytest.approx(2 / 3),
                                               "exact_match": pytest.approx(1 / 3)}
    assert metrics["by_source"]["docs"]["score"] == pytest.approx(10 / 11)
    assert metrics["by_source"]["clips"]["score"] == 0.5
    assert metrics["by_modality"]["single_image"]["score"] == pytest.approx((2 + 10 / 11) / 4)
    assert metrics["by_modality"]["video"] == {"samples": 2, "metric": "exact_match", "score": 0.5, "exact_match": 0.5}
    assert metrics["score"] == pytest.approx((2 + 10 / 11 + 1) / 6) and metrics["exact_match"] == pytest.approx(2 / 6)
    written = {r["id"]: r for r in read_rows(tmp_path / "predictions.jsonl")}
    assert written["colours/1"]["correct"] and not written["colours/1"]["exact_match"]
    assert written["docs/3"]["score"] == pytest.approx(10 / 11) and not written["docs/3"]["correct"]
    assert len(written) == 7  # rows outside this evaluation are kept


def test_recipe_sources_choose_their_metric(tmp_path, small_data_root):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "sources:\n"
        "  - {name: si, path: single_image, modality: single_image, weight: 1, metric: multiple_choice}\n"
        "  - {name: vid, path: video, modality: video, weight: 1, video: {max_frames: 2}}\n"
        "  - {name: noval, path: 'text/train-*.tar', modality: text, weight: 1}\n"  # a glob: no held-out split
    )
    sources = eval_sources(str(recipe), small_data_root)
    assert [(s.name, s.metric, len(s.shards)) for s in sources] == [("si", "multiple_choice", 1), ("vid", "exact_match", 1)]
    assert [s.video for s in sources] == [(), (("max_frames", 2),)]  # a source's own video settings, as training
    assert {s.metric for s in eval_sources(str(recipe), small_data_root, metric="anls")} == {"anls"}
    recipe.write_text("sources:\n  - {name: si, path: single_image, modality: single_image, weight: 1, metric: bleu}\n")
    with pytest.raises(ValueError, match="source si: metric='bleu'; allowed"):
        eval_sources(str(recipe), small_data_root)


@pytest.fixture(scope="module")
def random_export(tmp_path_factory, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    return export_pretrained(model, tokenizer, tmp_path_factory.mktemp("export") / "export")


def test_rerun_generates_only_what_predictions_lack(random_export, small_data_root, tmp_path, monkeypatch):
    processor, prompts, model = load_export(random_export, "test")
    sources = eval_sources(str(small_data_root / "multi_image"), small_data_root)
    generated = []

    def counting(model, inputs, *args, **kwargs):
        replies = real(model, inputs, *args, **kwargs)
        generated.append(len(replies))
        return replies

    real = evaluate_module.generate_replies
    monkeypatch.setattr(evaluate_module, "generate_replies", counting)
    logger = CSVLogger(tmp_path / "csv", name="run")  # a run's logger gets the metrics too
    first = evaluate(processor, prompts, model, sources, tmp_path, max_samples=3, batch_size=2, max_new_tokens=3, logger=logger)
    assert first["samples"] == 3 and sum(generated) == 3
    (csv,) = (tmp_path / "csv").rglob("metrics.csv")
    assert csv.read_text().splitlines()[0].split(",")[:3] == ["eval/exact_match", "eval/modality/multi_image", "eval/score"]
    path = tmp_path / "predictions.jsonl"
    before = read_rows(path)
    with open(path, "a") as f:
        f.write('{"id": "multi_image/cut sho')  # a kill in the middle of a write
    generated.clear()
    second = evaluate(processor, prompts, model, sources, tmp_path, max_samples=5, batch_size=2, max_new_tokens=3)
    assert second["samples"] == 5 and sum(generated) == 2
    after = read_rows(path)
    assert [r["key"] for r in after] == [r["key"] for r in before] + [f"multi_image/multi_image_val_00000{i}" for i in (3, 4)]
    assert [r["id"] for r in after] == [f"multi_image_val_00000{i}" for i in range(5)]  # the samples' own ids
    assert [r["prediction"] for r in after[:3]] == [r["prediction"] for r in before]
    # Batches are left-padded: a sample's greedy reply does not depend on what it was batched with.
    evaluate(processor, prompts, model, sources, tmp_path / "alone", max_samples=3, batch_size=1, max_new_tokens=3)
    assert [r["prediction"] for r in read_rows(tmp_path / "alone" / "predictions.jsonl")] == [r["prediction"] for r in before]


def test_ov_eval_names_bad_input_before_loading(random_export, small_data_root, tmp_path, capsys):
    for argv, message in [
        ([str(tmp_path), str(small_data_root / "video")], "no config.json, so not a Hugging Face export"),
        ([str(random_export), str(tmp_path / "nothing")], "no such recipe"),
        ([str(random_export), str(small_data_root / "video"), "--batch-size", "0"], "--batch-size=0: must be a positive"),
    ]:
        with pytest.raises(SystemExit):
            ov_eval(argv)
        assert message in capsys.readouterr().err


def test_ov_chat_conversation_keeps_the_first_turns_media(random_export, tmp_path, monkeypatch, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(noise_png(48, 40, 0))
    seen = []

    def spy(model, inputs, *args, **kwargs):
        seen.append(inputs)
        return real(model, inputs, *args, **kwargs)

    real = chat_module.generate_replies
    monkeypatch.setattr(chat_module, "generate_replies", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\nAnd its shape?\n"))
    assert ov_chat([str(random_export), "--image", str(image), "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(seen) == 2
    image_token = json.loads((random_export / "config.json").read_text())["image_token_index"]
    first, second = seen
    assert int((first["input_ids"] == image_token).sum()) == int((second["input_ids"] == image_token).sum()) > 0
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    # The second prompt holds the first turn and its reply.
    assert second["input_ids"].shape[1] > first["input_ids"].shape[1] + 4


def test_model_card_code_runs(random_export, tmp_path, monkeypatch, capsys):
    """The card's Python snippet, as a reader would paste it, loads the export and prints a reply."""
    card = (random_export / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("max_new_tokens=64", "max_new_tokens=2")
    (tmp_path / "photo.png").write_bytes(noise_png(40, 60, 1))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # its print ran (a random model's reply may be blank)


def test_ov_eval_reads_a_recipe_where_the_run_that_made_the_export_read_its_data(
    random_export, small_data_root, tmp_path, monkeypatch
):
    """`ov-eval RUN/export synthetic_onevision` without --root: the held-out shards of the data the run trained on
    (its synthetic settings, or its data.root), else those of the default run's settings."""

    from ov_train.cli.eval import default_root
    from ov_train.data.synthetic import synthetic_root
    from tests.conftest import plan_of

    default = plan_of([]).data
    assert default_root(random_export) == synthetic_root(default.config.root, **default.synthetic)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "export").symlink_to(random_export, target_is_directory=True)
    config = "seed: 3\ndata:\n  root: null\n  synthetic: {train_per_subset: 64, val_per_subset: 16, image_px: 32}\n"
    (run / ".hydra" / "config.yaml").write_text(config)
    assert default_root(run / "export") == synthetic_root(None, 64, 16, 32, 3)
    (run / ".hydra" / "config.yaml").write_text(config.replace("root: null", f"root: {small_data_root}"))
    assert default_root(run / "export") == small_data_root
    seen = {}
    monkeypatch.setattr("ov_train.cli.eval.load_export", lambda *a, **k: (_ for _ in ()).throw(SystemExit(7)))
    monkeypatch.setattr("ov_train.cli.eval.eval_sources", lambda data, root, metric, allow_pipe: seen.setdefault("root", root))
    with pytest.raises(SystemExit):
        ov_eval([str(run / "export"), "synthetic_onevision"])
    assert seen["root"] == small_data_root


def test_ov_eval_runs_no_command_from_a_run_directory(random_export, small_data_root, tmp_path, capsys):
    """A received run directory whose .hydra/config.yaml says data.root: "pipe:touch MARKER; cat SHARD #": joined onto
    the recipe's paths, webdataset ran it through a shell. ov-eval refuses it before any work, naming the file and
    the key; typed as --root, the same root is the user's own command and runs."""
    marker = tmp_path / "ran"
    root = f"pipe:touch {marker}; cat {small_data_root / 'multi_image' / 'val-000000.tar'} #"
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "export").symlink_to(random_export, target_is_directory=True)
    (run / ".hydra" / "config.yaml").write_text(json.dumps({"seed": 0, "data": {"root": root}}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sources:\n  - {name: m, path: multi_image, val: val.tar, modality: multi_image, weight: 1}\n")
    argv = [str(run / "export"), str(recipe), "--max-samples", "1", "--max-new-tokens", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        ov_eval(argv)
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert f"{run / '.hydra' / 'config.yaml'}: data.root='pipe:touch {marker}" in err and "give --root" in err
    synthetic = {"root": root, "synthetic": {"train_per_subset": 4, "val_per_subset": 2, "image_px": 32}}
    (run / ".hydra" / "config.yaml").write_text(json.dumps({"seed": 0, "data": synthetic}))
    with pytest.raises(SystemExit):  # a synthetic run's data.root: the shipped recipe's paths are joined onto it
        ov_eval([str(run / "export"), "synthetic_onevision", "--max-samples", "1", "--out", str(tmp_path / "out")])
    assert "is a shell command (pipe:)" in capsys.readouterr().err
    assert not marker.exists()
    assert ov_eval([*argv, "--root", root]) == 0
    assert marker.exists() and len(read_rows(tmp_path / "out" / "predictions.jsonl")) == 1


def test_ov_eval_and_ov_chat_sample_video_frames_as_the_exports_stage_did(tiny_model_and_tokenizer, tmp_path):
    """A stage with its own video settings (4 frames spread uniformly, decoded at 16 px): ov-eval and ov-chat feed
    the frames training fed (config.json's ov_train_media), not 1 frame per second of the clip."""
    import copy

    import numpy as np
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_train.cli.chat import read_video
    from ov_train.data.samples import SampleProcessor
    from ov_train.data.video import encode_mp4
    from ov_train.eval.inference import export_video, sample_media
    from ov_train.vision.geometry import VisionGeometry
    from ov_train.vision.preprocess import preprocess_frames
    from ov_train.vision.settings import apply_to_model_config
    from tests.conftest import plan_of
    from tests.helpers import raw_sample

    model, tokenizer = tiny_model_and_tokenizer
    media = plan_of(["stage.max_frames=4", "stage.frame_sampling=uniform", "stage.frame_size=16"]).data.samples.media
    config = copy.deepcopy(model.config)
    apply_to_model_config(config, media)
    export = export_pretrained(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path / "export")
    video = export_video(LlavaOnevisionConfig.from_pretrained(export))
    clip = encode_mp4(np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8), fps=2)
    raw = raw_sample("v", "<video>\nWhich way?", "left", video=clip)
    geometry = VisionGeometry.from_model_config(config)
    trained = SampleProcessor(tokenizer, geometry, "qwen_1_5", media, 4096)(raw)["frames"]
    _, frames = sample_media(raw, video)
    assert frames.shape == (4, 16, 16, 3) and torch.equal(preprocess_frames(frames, geometry), trained)
    # ov-eval: the export's settings, a recipe source's own laid over them, --max-frames over both.
    from types import SimpleNamespace

    from ov_train.eval.evaluate import Evaluator

    stub = SimpleNamespace(config=LlavaOnevisionConfig.from_pretrained(export))
    for source_video, cap, expected in [((), None, 4), ((("max_frames", 2),), None, 2), ((("max_frames", 2),), 3, 3)]:
        source = EvalSource("clips", (), "exact_match", "video", source_video)
        pending = Evaluator(None, None, stub, tmp_path, 4, cap).pending(source, "clips/v", raw)
        assert pending.frames.shape[0] == expected
    (tmp_path / "clip.mp4").write_bytes(clip)
    assert np.array_equal(read_video(str(tmp_path / "clip.mp4"), video), frames)


def test_tools_say_why_a_single_crop_stage_export_has_no_processor(tiny_model_and_tokenizer, tmp_path, capsys):
    """A stage-1 export (stage.image_strategy=square) has no processor files by design: ov-chat and ov-eval say so,
    rather than send the user to re-export it (which writes the same directory)."""
    import copy

    from transformers import LlavaOnevisionForConditionalGeneration

    from ov_train.vision.settings import apply_to_model_config
    from tests.conftest import plan_of

    model, tokenizer = tiny_model_and_tokenizer
    config = copy.deepcopy(model.config)
    apply_to_model_config(config, plan_of(["stage=pretrain"]).data.samples.media)
    export = export_pretrained(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path / "export")
    for tool, argv in ((ov_chat, [str(export), "hi"]), (ov_eval, [str(export), str(tmp_path)])):
        with pytest.raises(SystemExit):
            tool(argv)
        err = capsys.readouterr().err
        assert "stage.image_strategy=square" in err and "model.init_from" in err and "re-export" not in err


def test_rerun_refuses_predictions_of_another_export_or_settings(random_export, small_data_root, tmp_path, capsys):
    """A rerun skips the samples already in predictions.jsonl: after the export changed (a longer run, a re-export)
    or with other generation settings, those rows are not this export's replies, so ov-eval refuses the directory."""
    import os
    import shutil

    export = shutil.copytree(random_export, tmp_path / "export")
    argv = [str(export), str(small_data_root / "text"), "--out", str(tmp_path / "out"), "--max-samples", "2"]
    assert ov_eval([*argv, "--max-new-tokens", "2"]) == 0
    assert ov_eval([*argv, "--max-new-tokens", "2"]) == 0  # the same export and settings: resumes
    for change, culprit in [("--max-new-tokens 3", "--max-new-tokens"), ("weights", "export weights")]:
        if change == "weights":
            (weights,) = export.glob("*.safetensors")
            os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
        with pytest.raises(SystemExit):
            ov_eval([*argv, "--max-new-tokens", change.split()[-1] if change != "weights" else "2"])
        err = capsys.readouterr().err
        assert f"holds replies generated with another {culprit}" in err and "give another --out" in err
    assert len(read_rows(tmp_path / "out" / "predictions.jsonl")) == 2  # nothing was lost


@pytest.mark.parametrize("placement", ["front", "as_is"])
def test_ov_eval_places_a_turns_image_as_the_exports_stage_did(tiny_model_and_tokenizer, tmp_path, placement):
    """Data with its <image> after the question: training (stage.media_placement=front, the default) moved it to
    the front; ov-eval's prompt ids are training's, for either placement the export records."""
    import copy
    from types import SimpleNamespace

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from ov_train.data.samples import SampleProcessor
    from ov_train.eval.evaluate import Evaluator
    from ov_train.eval.inference import load_processor
    from ov_train.text.template import IGNORE_INDEX
    from ov_train.vision.geometry import VisionGeometry
    from ov_train.vision.settings import apply_to_model_config
    from tests.conftest import plan_of
    from tests.helpers import raw_sample

    model, tokenizer = tiny_model_and_tokenizer
    samples = plan_of([f"stage.media_placement={placement}"]).data.samples
    config = copy.deepcopy(model.config)
    apply_to_model_config(config, samples.media, samples.placement)
    export = export_pretrained(LlavaOnevisionForConditionalGeneration(config), tokenizer, tmp_path / "export")
    raw = raw_sample("s", "What colour is the shape? <image>", "red", images=[noise_png(40, 30, 1)])
    geometry = VisionGeometry.from_model_config(config)
    trained = SampleProcessor(tokenizer, geometry, "qwen_1_5", samples.media, 4096,
                              placement=placement)(raw)
    labels = trained["labels"].tolist()
    prompt_ids = trained["input_ids"].tolist()[: next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)]
    processor = load_processor(export)
    stub = SimpleNamespace(config=LlavaOnevisionConfig.from_pretrained(export))
    pending = Evaluator(processor, None, stub, tmp_path, 4, None).pending(EvalSource("s", (), "exact_match"), "s/s", raw)
    prompt = processor.apply_chat_template(pending.messages, add_generation_prompt=True)
    assert processor(text=prompt, images=[pending.images], return_tensors="pt")["input_ids"][0].tolist() == prompt_ids


# Nested loops: 10^10 steps, hours in transformers' Jinja sandbox (which allows ranges up to 100000).
RUNAWAY = "{%- for i in range(100000) -%}{%- for j in range(100000) -%}{%- endfor -%}{%- endfor -%}"


def hostile_copy(export, tmp_path, template: str):
    """A copy of `export` whose chat_template.jinja is `template`."""
    import shutil

    copy = tmp_path / "hostile"
    shutil.copytree(export, copy)
    (copy / "chat_template.jinja").write_text(template)
    return copy


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang, if the block runs longer than `seconds` (an alarm cuts into a Python loop)."""
    def expire(*_):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    start, (outer, _) = time.monotonic(), signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        # The suite's per-test timeout (pytest-timeout) shares this timer: what was left of it is set again.
        signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001) if outer else 0)
        signal.signal(signal.SIGALRM, previous)


def test_chat_prompts_render_as_the_processor_does_and_bound_every_render(random_export, tiny_model_and_tokenizer,
                                                                         tmp_path):
    from ov_train.eval.inference import PROBE, RENDER_LIMIT_S, ChatPrompts, ExportError, load_processor

    conversation = [*PROBE, {"role": "assistant", "content": "Small."}, {"role": "user", "content": "<image>\nAnd?"}]
    plain = export_pretrained(*tiny_model_and_tokenizer, tmp_path / "plain", template="plain")
    for export in (random_export, plain):  # our templates: qwen_1_5, plain
        processor = load_processor(export)
        start = time.monotonic()
        prompts = ChatPrompts(processor, export)
        print(f"ChatPrompts of {export.name} (fork + probe render): {time.monotonic() - start:.3f} s")
        assert prompts.source == export / "chat_template.jinja"
        for messages in (PROBE, conversation):
            assert prompts(messages) == processor.apply_chat_template(messages, add_generation_prompt=True)
        prompts.close()
    # Runaway loops, at load (the probe) or only on a longer conversation than the probe's: refused in about
    # RENDER_LIMIT_S, naming the file, and the template stays refused.
    ours = (random_export / "chat_template.jinja").read_text()
    later = "{%- if messages | length > 3 -%}" + RUNAWAY + "{%- endif -%}" + ours
    for template, probe_passes in ((RUNAWAY + ours, False), (later, True)):
        hostile = hostile_copy(random_export, tmp_path / str(probe_passes), template)
        start = time.monotonic()
        with deadline(60), pytest.raises(ExportError) as err:
            prompts = ChatPrompts(load_processor(hostile), hostile)
            assert probe_passes and prompts(PROBE)
            prompts(conversation)
        assert time.monotonic() - start < RENDER_LIMIT_S + 4
        assert str(err.value).startswith(f"{hostile / 'chat_template.jinja'}: its chat template did not render a"
                                         f" conversation of {5 if probe_passes else 3} messages in 1 s")
        if probe_passes:
            with pytest.raises(ExportError, match="its chat template was refused"):
                prompts(PROBE)
    # A range the sandbox refuses fails at load, with the sandbox's reason.
    hostile = hostile_copy(random_export, tmp_path / "range", "{% for i in range(10**6) %}{% endfor %}")
    with pytest.raises(ExportError, match=r"chat_template.jinja: its chat template fails on a conversation of 3"
                                          r" messages: OverflowError: Range too big"):
        ChatPrompts(load_processor(hostile), hostile)


class _StubProcessor:
    chat_template = "stub"

    def apply_chat_template(self, messages, add_generation_prompt):
        return f"{len(messages)} messages"


def _tool_killed_after_chat_prompts(export, conn) -> None:
    from ov_train.eval.inference import ChatPrompts

    conn.send(ChatPrompts(_StubProcessor(), export)._renderer.pid)
    os._exit(0)  # as a kill ends a tool: no exit handler closes or stops the renderer


def test_the_chat_template_renderer_ends_with_the_tool_that_started_it(tmp_path):
    """A tool that ends without closing its ChatPrompts (killed) leaves no renderer behind: an orphan idled for ever
    (it held a copy of the tool's end of their pipe, so never saw it close), holding the tool's standard output
    open, and whatever read that to its end hung with it."""
    import multiprocessing

    import psutil

    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    tool = context.Process(target=_tool_killed_after_chat_prompts, args=(tmp_path, theirs))
    tool.start()
    renderer = None
    try:
        assert ours.poll(60), "the tool never started its renderer"
        renderer = psutil.Process(ours.recv())
        tool.join(60)
        assert tool.exitcode == 0
        deadline = time.monotonic() + 20
        while renderer.is_running() and renderer.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not renderer.is_running() or renderer.status() == psutil.STATUS_ZOMBIE, "the renderer outlived its tool"
    finally:
        tool.kill()
        if renderer is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                renderer.kill()


def test_ov_chat_and_ov_eval_refuse_a_runaway_chat_template_before_loading_the_model(
    random_export, small_data_root, tmp_path, monkeypatch, capsys
):
    from transformers import LlavaOnevisionForConditionalGeneration

    hostile = hostile_copy(random_export, tmp_path, RUNAWAY + "{% for i in range(10**6) %}{% endfor %}")
    monkeypatch.setattr(LlavaOnevisionForConditionalGeneration, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model loaded"))
    for tool, argv in ((ov_chat, [str(hostile), "hi"]),
                       (ov_eval, [str(hostile), str(small_data_root / "multi_image"), "--out", str(tmp_path / "e")])):
        start = time.monotonic()
        with deadline(60), pytest.raises(SystemExit) as exit:
            tool(argv)
        assert exit.value.code == 2 and time.monotonic() - start < 10
        err = capsys.readouterr().err
        assert f"{hostile / 'chat_template.jinja'}: its chat template did not render a conversation" in err


def test_a_stock_transformers_5_directory_loads_and_answers_as_the_export(random_export, tmp_path, capsys):
    """transformers 5's save_pretrained keeps the image processor inside processor_config.json (no
    preprocessor_config.json): ov-chat reads that layout and answers as it does on ov-export's."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    stock = tmp_path / "stock"
    LlavaOnevisionForConditionalGeneration.from_pretrained(random_export).save_pretrained(stock)
    AutoProcessor.from_pretrained(random_export).save_pretrained(stock)
    assert not (stock / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((stock / "processor_config.json").read_text())
    image = tmp_path / "image.png"
    image.write_bytes(noise_png(48, 40, 0))
    replies = []
    for export in (random_export, stock):
        assert ov_chat([str(export), "--image", str(image), "--max-new-tokens", "4", "What colour is it?"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()

    # A directory someone else wrote, without any image processor settings: no advice to re-export it with ov-export.
    (stock / "processor_config.json").unlink()
    with pytest.raises(SystemExit):
        ov_chat([str(stock), "hi"])
    err = capsys.readouterr().err
    assert "no image processor settings" in err and "ov-export" not in err and "save_pretrained" in err


def test_predictions_keep_the_samples_own_ids(random_export, tmp_path):
    """convert stores each sample under a sequence key (000000004) and keeps the user's id in its json: ov-eval's
    rows carry that id (`mine_004`), and the shard key only as `key`."""
    import webdataset as wds

    shards = tmp_path / "mine"
    shards.mkdir()
    with wds.TarWriter(str(shards / "val-000000.tar")) as tar:
        for n in (4, 7):
            turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
            tar.write({"__key__": f"{n:09d}", "json": json.dumps({"id": f"mine_{n:03d}", "conversations": turns}).encode(),
                       "img0.png": noise_png(40, 48, n)})
    processor, prompts, model = load_export(random_export, "test")
    evaluate(processor, prompts, model, eval_sources(str(shards), None), tmp_path / "out", max_new_tokens=2)
    rows = read_rows(tmp_path / "out" / "predictions.jsonl")
    assert [(r["id"], r["key"]) for r in rows] == [("mine_004", "mine/000000004"), ("mine_007", "mine/000000007")]


def test_export_files_share_one_mode(random_export):
    """model.safetensors was written 0600 (safetensors' private temporary file) beside 0644 files."""
    mask = os.umask(0)
    os.umask(mask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in random_export.iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}, modes
