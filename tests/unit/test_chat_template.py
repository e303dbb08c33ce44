"""The export's stock processor gives, through its chat template, the ids and pixels training fed the model.

For the local tokenizer and for a Qwen2-style tokenizer built here (Qwen2's pre-tokenizer and special tokens, and
Qwen2's own text-only chat template, as a real Qwen2 checkpoint has): AutoProcessor on processor-style messages
and the sample's media == SampleProcessor on the same sample, token by token and pixel for pixel.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoProcessor, GenerationConfig, LlavaOnevisionConfig, PreTrainedTokenizerFast

from ov_train.checkpoints.export import export_pretrained
from ov_train.config.media import MediaSettings
from ov_train.config.run_plan import model_plan
from ov_train.data.samples import SampleProcessor
from ov_train.data.video import decode_video, encode_mp4
from ov_train.eval.inference import load_processor
from ov_train.model.build import build_model
from ov_train.text.template import IGNORE_INDEX
from ov_train.text.tokenizer import _corpus
from ov_train.vision.geometry import VisionGeometry
from tests.conftest import compose_config
from tests.helpers import noise_png

# Qwen2's tokenizer.json pre-tokenizer pattern, and the chat template of Qwen2-7B-Instruct.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen2_style_tokenizer(path):
    """Byte-level BPE with Qwen2's normalizer, pre-tokenizer, special tokens and chat template, without the
    <image> / <video> tokens (the framework adds them). Its corpus has punctuation before newlines, so merges
    such as "?\\n" exist: a template that joined text differently from training would tokenize differently."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = _corpus()
    backend.train_from_iterator(lines + [f"{a}?\n{b}.\n\n{a}:\n" for a, b in zip(lines, lines[1:])], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=QWEN2_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    ).save_pretrained(path)
    return path


def png(h: int, w: int, seed: int) -> bytes:
    return noise_png(h, w, seed)


FRAMES = np.random.default_rng(7).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
VIDEO = encode_mp4(FRAMES, fps=1)

IMAGE, TEXT, VIDEO_PART = {"type": "image"}, (lambda t: {"type": "text", "text": t}), {"type": "video"}

# (name, LLaVA turns as training data has them, images, video, the same conversation as processor messages)
CASES = [
    ("image", [("human", "<image>\nWhat colour is the shape?"), ("gpt", "red")], [png(70, 30, 1)], None,
     [("user", [IMAGE, TEXT("What colour is the shape?")])]),
    ("multi_image", [("human", "<image>\n<image>\n<image>\nWhich image shows it?"), ("gpt", "second")],
     [png(32, 32, 2), png(50, 20, 3), png(16, 64, 4)], None,
     [("user", [IMAGE, IMAGE, IMAGE, TEXT("Which image shows it?")])]),
    ("video", [("human", "<video>\nWhich way does the square move?"), ("gpt", "left")], [], VIDEO,
     [("user", [VIDEO_PART, TEXT("Which way does the square move?")])]),
    ("text", [("human", "What is the opposite of up?"), ("gpt", "down")], [], None,
     [("user", "What is the opposite of up?")]),
    ("multi_turn", [("system", "Answer in one word."), ("human", "<image>\nWhat colour is it?"), ("gpt", "blue"),
                    ("human", "And its shape?"), ("gpt", "a square.")], [png(100, 250, 5)], None,
     [("system", [TEXT("Answer in one word.")]), ("user", [IMAGE, TEXT("What colour is it?")]),
      ("assistant", [TEXT("blue")]), ("user", [TEXT("And its shape?")])]),
]


def raw_sample(turns, images, video) -> dict:
    raw = {"__key__": "s", "json": json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]}).encode()}
    raw.update({f"img{i}.png": img for i, img in enumerate(images)})
    if video is not None:
        raw["mp4"] = video
    return raw


def last_reply_start(labels: list[int]) -> int:
    return max(k for k in range(1, len(labels)) if labels[k] != IGNORE_INDEX and labels[k - 1] == IGNORE_INDEX)


def make_export(tmp_path_factory, tokenizer_dir, template: str):
    overrides = [f"model.tokenizer={tokenizer_dir}"] if tokenizer_dir else []
    model, tokenizer = build_model(model_plan(compose_config(overrides).model), tmp_path_factory.getbasetemp() / "ov_cache")
    out = export_pretrained(model, tokenizer, tmp_path_factory.mktemp("export") / template, template=template)
    return out, tokenizer, VisionGeometry.from_model_config(model.config)


@pytest.fixture(scope="module", params=["local", "qwen2"])
def exports(request, tmp_path_factory):
    """qwen_1_5 and plain exports of a random tiny model, per tokenizer."""
    tokenizer_dir = None
    if request.param == "qwen2":
        tokenizer_dir = qwen2_style_tokenizer(tmp_path_factory.mktemp("qwen2") / "tokenizer")
    return {t: make_export(tmp_path_factory, tokenizer_dir, t) for t in ("qwen_1_5", "plain")}


def stock(export, messages, images, video, add_generation_prompt=True, processor=None):
    processor = processor or load_processor(export)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    frames = decode_video(video, 32)[0] if video is not None else None
    kwargs = {"images": [images]} if images else {}
    if frames is not None:
        kwargs["videos"] = [frames]
    return processor(text=prompt, return_tensors="pt", **kwargs)


def assert_same_pixels(ours: dict, theirs, exact: bool = True):
    """Images equal bit for bit (PIL backend) or within 8 levels of 255 (torchvision's resize). Video frames
    go through the torchvision-only video processor, which folds rescale and normalize into one step:
    equal within float rounding (frames at the crop size need no resize)."""
    check = torch.equal if exact else (lambda a, b: a.shape == b.shape and (a - b).abs().max() <= 2 * 8 / 255)
    for k, crops in enumerate(ours["images"]):
        n = crops.pixel_values.shape[0]
        assert check(theirs["pixel_values"][k, :n], crops.pixel_values)
        assert (theirs["pixel_values"][k, n:] == 0).all()  # padding to the batch's most crops
    if ours["frames"] is not None:
        assert torch.allclose(theirs["pixel_values_videos"][0], ours["frames"], rtol=0, atol=1e-6)


def to_messages(conversation):
    return [{"role": role, "content": content} for role, content in conversation]


def training_and_stock(export_entry, template: str, case, processor=None):
    """(training's example for the case's sample, the stock processor's prompt batch for its conversation)."""
    _, turns, images, video, conversation = case
    export, tokenizer, geometry = export_entry
    process = SampleProcessor(tokenizer, geometry, template, MediaSettings.of("anyres_max_9", 32), max_length=8192)
    ours = process(raw_sample(turns, images, video))
    theirs = stock(export, to_messages(conversation), pil_images(images), video, processor=processor)
    assert theirs["input_ids"][0].tolist() == ours["input_ids"].tolist()[: last_reply_start(ours["labels"].tolist())]
    return ours, theirs


def pil_images(images: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)) for b in images]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_stock_processor_gives_the_prompt_training_fed(exports, case):
    ours, theirs = training_and_stock(exports["qwen_1_5"], "qwen_1_5", case)
    assert_same_pixels(ours, theirs)
    # The whole conversation, replies included, renders as training's full sequence.
    _, turns, images, video, conversation = case
    full = to_messages(conversation) + [{"role": "assistant", "content": [TEXT(turns[-1][1])]}]
    whole = stock(exports["qwen_1_5"][0], full, pil_images(images), video, add_generation_prompt=False)
    assert whole["input_ids"][0].tolist() == ours["input_ids"].tolist()


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("multi_image", "video")], ids=["multi_image", "video"])
def test_plain_export_prompts_with_the_media_alone(exports, case):
    ours, theirs = training_and_stock(exports["plain"], "plain", case)
    assert_same_pixels(ours, theirs)
    # Generation stops at the "\n" that ends every plain reply in training.
    export, tokenizer, _ = exports["plain"]
    assert ours["labels"][-1] == tokenizer.encode("\n", add_special_tokens=False)[0]
    assert ours["labels"][-1] in GenerationConfig.from_pretrained(export).eos_token_id


def test_default_image_backend_gives_the_same_ids_and_nearly_the_same_pixels(exports):
    """AutoProcessor alone picks torchvision's resize (a few levels off PIL's); the ids do not depend on it."""
    processor = AutoProcessor.from_pretrained(exports["qwen_1_5"][0])
    ours, theirs = training_and_stock(exports["qwen_1_5"], "qwen_1_5", CASES[1], processor=processor)
    assert_same_pixels(ours, theirs, exact=False)


def test_export_stops_generation_at_the_end_of_reply_token(exports):
    export, tokenizer, _ = exports["qwen_1_5"]
    im_end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    config = LlavaOnevisionConfig.from_pretrained(export)
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == (im_end, pad)
    generation = GenerationConfig.from_pretrained(export)
    assert (generation.eos_token_id, generation.pad_token_id) == (im_end, pad)
    assert (export / "README.md").read_text().count("`qwen_1_5`") >= 2


def test_export_template_renders_media_whatever_template_the_tokenizer_had(exports):
    """Qwen2's own template concatenates `content` as a string, so list contents with images fail there; the
    export's renders them."""
    export, tokenizer, _ = exports["qwen_1_5"]
    messages = to_messages(CASES[0][4])
    if tokenizer.chat_template == QWEN2_CHAT_TEMPLATE:
        with pytest.raises(TypeError):
            tokenizer.apply_chat_template(messages, tokenize=False)
    rendered = load_processor(export).apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
