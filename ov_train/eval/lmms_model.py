"""`python -m lmms_eval --model ov_train --model_args pretrained=RUN/export`: lmms-eval benchmarks on an export,
through ov-chat's and ov-eval's inference (eval/inference.py). Frames are sampled as the export's stage sampled them
(config.json's `ov_train_media`: fps, cap, `fps` or `uniform`; lmms-eval's own video loaders take a fixed count
uniformly), resized with PIL as training did, and a task prompt without a placeholder gets one in front of it for
each image or video, then the stage's placement (`front`: the single placeholder first, then a newline).

Needs the `eval` extra (lmms-eval, best in an environment of its own: it pulls its own torch).
"""
from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from PIL import Image

from ov_train.constants import IMAGE_TOKEN, VIDEO_TOKEN
from ov_train.eval.inference import (
    export_placement,
    export_video,
    generate_replies,
    load_export,
    processor_inputs,
    read_frames,
    sampling_kwargs,
    training_frames,
)
from ov_train.text.template import media_first

DEFAULT_MAX_NEW_TOKENS = 128  # as ov-eval's --max-new-tokens, when a task's generation_kwargs give none


def _flatten(visuals) -> list:
    out = []
    for v in visuals or []:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


class OvTrain(lmms):
    """An ov_train export (or any LLaVA-OneVision directory ov-chat loads) as an lmms-eval model: generation tasks,
    images (PIL) and videos (file paths), one request at a time, greedy unless a task asks for a temperature."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32", max_frames: int | None = None,
                 **_lmms_eval_settings):  # batch_size, max_batch_size...: requests run one at a time
        super().__init__()
        self.processor, self.prompts, self.model = load_export(pretrained, "lmms-eval", device, getattr(torch, dtype))
        self.video = export_video(self.model.config, int(max_frames) if max_frames else None)
        self.placement = export_placement(self.model.config)

    def prompt(self, context: str, images: int, videos: int) -> str:
        """The chat prompt of a task's text: placeholders in front when it has none, as LLaVA data and lmms-eval's
        llava models do, then the export's placement and chat template."""
        text = context
        if videos and VIDEO_TOKEN not in text:
            text = f"{VIDEO_TOKEN}\n" * videos + text
        if images and IMAGE_TOKEN not in text:
            text = f"{IMAGE_TOKEN}\n" * images + text
        text = media_first(text) if self.placement == "front" else text
        return self.prompts([{"role": "user", "content": text}])

    def _answer(self, context: str, gen_kwargs: dict, visuals: list) -> str:
        images = [v.convert("RGB") for v in visuals if isinstance(v, Image.Image)]
        videos = [str(v) for v in visuals if isinstance(v, (str, Path))]
        if len(videos) > 1:
            raise ValueError(f"ov_train: one video per request, got {len(videos)}")
        frames = None
        if videos:
            frames = training_frames(read_frames(Path(videos[0]).read_bytes(), self.video, videos[0]), self.model)
        inputs = processor_inputs(self.processor, self.model, [self.prompt(context, len(images), len(videos))],
                                  [images], [frames])
        sampling = sampling_kwargs(float(gen_kwargs.get("temperature") or 0), gen_kwargs.get("top_p"))
        (ids,) = generate_replies(self.model, inputs, int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                                  **sampling)
        reply = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            reply = reply.split(stop)[0] if stop else reply
        return reply.strip()

    def generate_until(self, requests) -> list[str]:
        replies = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
            replies.append(self._answer(context, dict(gen_kwargs), visuals))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), replies[-1])
        return replies

    def loglikelihood(self, requests):
        raise NotImplementedError("ov_train: generation tasks only (output_type: generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("ov_train: single-round generation tasks only")
