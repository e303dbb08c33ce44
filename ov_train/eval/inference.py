"""Stock inference on an export: AutoProcessor + LlavaOnevisionForConditionalGeneration.generate.

ov-chat, ov-eval and the validation generation (training/metrics.py) all end in `generate_replies`, so a
reply means the same thing everywhere: the generated tokens before the first end-of-reply id. ov-chat's and
ov-eval's prompts come from the export's chat template through `ChatPrompts`, each render bounded in time.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import multiprocessing
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ov_train.config.media import VideoSettings
from ov_train.data.samples import VIDEO_FIELDS, image_fields
from ov_train.data.video import decode_video
from ov_train.text.template import ROLES, media_first
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.preprocess import resize_frames
from ov_train.vision.settings import inference_refusal, recorded_media


class ExportError(ValueError):
    """An export directory that is not one, or media that cannot be read; the message names the culprit."""


def check_export(path: str | Path) -> Path:
    """`path` if it is a LLaVA-OneVision export (config.json of model_type llava_onevision, processor files)."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir():
        raise ExportError(f"{path}: not a directory; expected an export (RUN/export or ov-export's output)")
    if not config.is_file():
        raise ExportError(f"{path}: no config.json, so not a Hugging Face export (RUN/export or ov-export's output)")
    try:
        settings = json.loads(config.read_text())
    except ValueError as err:
        raise ExportError(f"{config}: not valid JSON ({err})") from err
    model_type = settings.get("model_type")
    if model_type != "llava_onevision":
        raise ExportError(f"{path}: model_type {model_type!r}, expected 'llava_onevision'")
    refusal = inference_refusal(SimpleNamespace(**settings))  # a single-crop stage: no processor files by design
    if not has_image_processor(path) and refusal:
        raise ExportError(f"{path}: {refusal}; chat with or evaluate an export of an anyres_max_N stage")
    if not has_image_processor(path):
        # Re-exporting is advice only for a directory ov_train wrote (config.json records its stage's media).
        fix = ("re-export it with ov-export" if "ov_train_media" in settings else
               "save its processor there with AutoProcessor.from_pretrained(...).save_pretrained(DIR)")
        raise ExportError(f"{path}: no image processor settings (preprocessor_config.json, or processor_config.json"
                          f" with an image_processor, as transformers 5 saves them); {fix}")
    return path


def has_image_processor(path: Path) -> bool:
    """Either layout transformers reads: preprocessor_config.json (ov-export's, transformers 4's), or the
    image_processor inside processor_config.json (transformers 5's save_pretrained)."""
    if (path / "preprocessor_config.json").is_file():
        return True
    try:
        return "image_processor" in json.loads((path / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


def load_processor(path: str | Path):
    """The stock processor of an export, its image processor on the PIL backend: training resized with PIL,
    and the default torchvision backend lands a few pixel levels off it. Without torchvision (a plain `pip install
    .`), the same processor with a PIL video processor (eval/pil_processor.py)."""
    if importlib.util.find_spec("torchvision") is None:
        from ov_train.eval.pil_processor import pil_processor

        return pil_processor(path)
    from transformers import AutoImageProcessor, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    return processor


# Longest a chat template may take to render one conversation (ours take about a millisecond).
RENDER_LIMIT_S = 1.0
# What a template renders at load time: an image, a reply and a follow-up question, then the generation prompt.
PROBE = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
]
# Where a processor's chat template can come from in an export, as transformers looks for it.
TEMPLATE_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja")


def template_file(path: str | Path, template) -> Path:
    """The file of export `path` that holds the processor's chat template `template` (the export itself if none
    does, e.g. a chat_templates/ directory)."""
    text = template.get("default") if isinstance(template, dict) else template
    for name in TEMPLATE_FILES:
        file = Path(path) / name
        if file.is_file():
            held = file.read_text() if file.suffix == ".jinja" else json.loads(file.read_text()).get("chat_template")
            if held == text:
                return file
    return Path(path)


# How often an idle renderer checks that the tool that started it still runs.
TOOL_CHECK_S = 1.0


def _render_forever(processor, conn, tool_end, tool: int) -> None:
    """The renderer process: a conversation in, (True, its prompt) or (False, the error) out, until the tool ends.

    Fork copied the tool's end of the pipe into this process: it is closed first, or this process would hold it
    open itself and never see the pipe close. And a tool that ends without closing its end (killed, or a process it
    forked later holding a copy) is noticed by this process being handed to another parent; left running, an idle
    renderer would hold the tool's standard output open for ever, and whatever reads it to its end with it."""
    tool_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the tool's to handle; this process is killed
    while True:
        try:
            while not conn.poll(TOOL_CHECK_S):
                if os.getppid() != tool:
                    return
            messages = conn.recv()
        except EOFError:  # the tool ended
            return
        try:
            reply = (True, processor.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as err:  # a template error, reported in the tool
            reply = (False, f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except OSError:  # the tool ended while this rendered
            return


class ChatPrompts:
    """Prompts from an export's chat template: `processor.apply_chat_template(messages, add_generation_prompt=True)`,
    each render given RENDER_LIMIT_S. A template is a program from the export, and transformers' Jinja sandbox
    bounds neither loops nor the size of what it builds: nested loops render for hours. A thread cannot be
    stopped and an alarm cannot cut into one long C call (a sort of a huge list), so rendering runs in a process of
    its own, forked from the tool (the processor as loaded, nothing copied or re-imported), which is killed when a
    render runs over: the template is then refused, naming its file. The template renders PROBE once here, so a
    bad one is refused before the model loads."""

    def __init__(self, processor, export: str | Path):
        self.source = template_file(export, processor.chat_template)
        context = multiprocessing.get_context("fork")  # the processor as it is, at no start-up cost
        self._conn, child = context.Pipe()
        self._renderer = context.Process(target=_render_forever, args=(processor, child, self._conn, os.getpid()),
                                         daemon=True, name="chat-template")
        self._renderer.start()
        child.close()
        try:
            self(PROBE)
        except ExportError:
            self.close()
            raise

    def __call__(self, messages: list[dict]) -> str:
        if not self._renderer.is_alive():
            raise ExportError(f"{self.source}: its chat template was refused")
        self._conn.send(messages)
        if not self._conn.poll(RENDER_LIMIT_S):
            self.close()
            raise ExportError(
                f"{self.source}: its chat template did not render a conversation of {len(messages)} messages in"
                f" {RENDER_LIMIT_S:g} s (ours take milliseconds), so it is refused: loops that run away? Re-export"
                " with ov-export, or write chat_template.jinja anew"
            )
        try:
            ok, prompt = self._conn.recv()
        except EOFError:
            self.close()
            raise ExportError(f"{self.source}: rendering its chat template ended the renderer") from None
        if not ok:
            raise ExportError(f"{self.source}: its chat template fails on a conversation of {len(messages)}"
                              f" messages: {prompt}")
        return prompt

    def close(self) -> None:
        if self._renderer.is_alive():
            self._renderer.kill()
        self._renderer.join()


def load_export(path: str | Path, tool: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(processor, its ChatPrompts, model in eval mode) of an export, after checking it is one; its chat template is
    tried (ChatPrompts) before the model loads."""
    from transformers import LlavaOnevisionForConditionalGeneration

    path = check_export(path)
    processor = load_processor(path)
    prompts = ChatPrompts(processor, path)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
    return processor, prompts, model.to(device).eval()


def open_image(data: bytes | str | Path, name: str) -> Image.Image:
    """An RGB image from bytes or a file; a missing or unreadable one is an ExportError naming it."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise ExportError(f"image not found: {name}") from err
    except Exception as err:  # PIL raises many types for broken files
        raise ExportError(f"cannot read image {name}: {err}") from err


def export_video(config, max_frames: int | None = None) -> VideoSettings:
    """How the export's last stage sampled video frames (config.json's `ov_train_media`; the stage defaults for an
    export that does not record it), with `max_frames` as the cap when given: tools feed the frames training fed."""
    video = VideoSettings(**(recorded_media(config).get("video") or {}))
    return dataclasses.replace(video, max_frames=max_frames) if max_frames else video


def export_placement(config) -> str:
    """Where the export's stage put a turn's single <image>/<video> (ov_train_media's media_placement; `as_is` for
    an export that does not record it)."""
    return recorded_media(config).get("media_placement", "as_is")


def read_frames(data: bytes, video: VideoSettings, name: str) -> np.ndarray:
    return decode_video(data, video.max_frames, name, video.fps, video.sampling, video.frame_size)[0]


def sample_media(raw: dict, video: VideoSettings) -> tuple[list[Image.Image], np.ndarray | None]:
    """The images (img0, img1, ... in order) and the video frames of a raw shard sample, decoded as training does."""
    key = raw.get("__key__", "?")
    images = [open_image(raw[f], f"{key}.{f}") for f in image_fields(raw)]
    field = next((f for f in VIDEO_FIELDS if f in raw), None)
    frames = read_frames(raw[field], video, f"{key}.{field}") if field else None
    return images, frames


def training_frames(frames: np.ndarray, model) -> np.ndarray:
    """Video frames resized to the crop size with PIL, as training does, before the stock video processor (it
    has only a torchvision backend, whose bicubic resize lands a level off PIL's on some pixels)."""
    return resize_frames(frames, VisionGeometry.from_model_config(model.config))


def conversation_messages(conversations: list[dict], placement: str = "as_is") -> tuple[list[dict], str]:
    """LLaVA turns -> (processor messages before the last reply, the last reply). String contents are LLaVA's own
    text ("<image>\\nWhat is it?"), which the export's chat template renders as training did; `placement` `front`
    first moves a turn's single placeholder to its start, as training's stage.media_placement=front did."""
    place = media_first if placement == "front" else (lambda text: text)
    messages = [{"role": ROLES.get(t.get("from"), t.get("from")),
                 "content": place(t["value"]) if isinstance(t.get("value"), str) else t.get("value")}
                for t in conversations]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("conversation has no gpt (assistant) turn to evaluate")
    return messages[:last], messages[last]["content"]


def stop_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def sampling_kwargs(temperature: float = 0.0, top_p: float | None = None) -> dict:
    """Greedy at temperature 0, otherwise sampling at that temperature (and top-p)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, **({"top_p": top_p} if top_p is not None else {})}


@torch.inference_mode()
def generate_replies(model, inputs: dict, max_new_tokens: int, stops: list[int] | None = None,
                     pad_id: int | None = None, **sampling) -> list[list[int]]:
    """model.generate on prepared inputs (processor output, or inputs_embeds); per row, the new tokens before the
    first end-of-reply id: `stops`, by default the export's generation config's."""
    stops = stop_ids(model) if stops is None else stops
    sampling = sampling or {"do_sample": False}
    if not sampling.get("do_sample"):
        sampling = {**sampling, "temperature": None, "top_p": None, "top_k": None}  # no warnings about unused ones
    if pad_id is not None:
        sampling["pad_token_id"] = pad_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stops or None, **sampling)
    # With input_ids, generate returns prompt + new tokens; with inputs_embeds alone, the new tokens.
    new = out[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out
    replies = []
    for row in new.tolist():
        end = next((k for k, t in enumerate(row) if t in stops), len(row))
        replies.append(row[:end])
    return replies


def processor_inputs(processor, model, prompts: list[str], images: list[list], videos: list) -> dict:
    """The processor's batch (left-padded, for generation) on the model's device, floats in its dtype."""
    kwargs = {"text": prompts, "return_tensors": "pt", "padding": True, "padding_side": "left"}
    if any(images):
        # Nested per prompt: a flat list would make every image a sample of its own (anyres), where training
        # gives each image of a multi-image sample one crop.
        kwargs["images"] = [list(imgs) for imgs in images]
    if any(v is not None for v in videos):
        kwargs["videos"] = [v for v in videos if v is not None]
    batch = processor(**kwargs)
    return {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device) for k, v in batch.items()}
