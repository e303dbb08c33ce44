"""The step the planner traces: a batch of the data's modalities at their largest, as the collate step lays it out.

A training step takes one batch of up to `tokens` real tokens (the token budget), which ov_train packs into
rows of `max_tokens`. The planner fills that budget with samples of the recipe's modalities in proportion to
the recipe's weights, each modality's share filled with its largest samples (the last one cut to fit):
- video: `max_frames` frames (at 384 px 196 tokens each at stage.video_pool=2, 81 at 3, 49 at 4; newlines as
  stage.video_newline), the most tower work per token;
- multi_image: up to 12 images of one crop each (729 + 1 tokens);
- single_image: the largest of the recipe's example images whose anyres tokens fit (3000x800 -> 8,019 at
  384 px), or one crop under `pad` or `square`;
- text: text only.
Every sample also carries a prompt (PROMPT_TOKENS, no loss) and a reply (REPLY_TOKENS, supervised).
Visual token counts come from ov_train.vision.tokens, the model's own arithmetic.

Under sequence parallelism (strategy.sequence_parallel=N) the budget is the group's: its N ranks share one packed
row. `rank_share` is what one rank of the group holds: L/N of the row's tokens (Ulysses keeps a shard of the row
outside attention, and the whole row over heads / N inside, the same bytes) and 1/N of the crops and frames (the
frame-parallel tower): each video and text sample cut to 1/N of its frames and tokens, and every N-th image sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ov_train.config.recipe import read_recipe
from ov_train.constants import IGNORE_INDEX, MODALITIES
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL
from ov_train.vision.tokens import anyres_tokens, best_resolution, single_crop_tokens, video_tokens

PROMPT_TOKENS = 64  # system prompt, turn markers and the question
REPLY_TOKENS = 192  # supervised answer tokens per sample
MAX_IMAGES = 12  # the recipe's multi-image samples hold up to 12 images
# Height x width of example images at 384 px, most tokens first: 8,019, 7,269, 4,744, 2,929 and 1,485 tokens under
# anyres_max_9, as the public LLaVA-NeXT code counts them (vision/tokens.py reproduces those counts).
IMAGE_SIZES = ((3000, 800), (1080, 1920), (1024, 768), (480, 640), (384, 384))
# The OneVision stage's share of each modality, as its shipped recipe states it (data_recipes/onevision.yaml).
ONEVISION_MIX = read_recipe("onevision")[0].shares("modality")
# The modalities in the order a step's budget is filled: most tower work per token first.
FILL_ORDER = ("video", "multi_image", "single_image", "text")
assert sorted(FILL_ORDER) == sorted(MODALITIES)


@dataclass(frozen=True)
class Sample:
    modality: str
    visual: tuple[int, ...]  # visual tokens per image or video
    crops: tuple[int, ...]  # tower crops (or frames) per image or video
    image_sizes: tuple[tuple[int, int], ...]  # (height, width) per image
    anyres: bool
    text: int  # prompt + reply tokens
    reply: int
    pool: int = DEFAULT_POOL  # a video's stage.video_pool and stage.video_newline
    layout: str = DEFAULT_NEWLINE

    @property
    def tokens(self) -> int:
        return sum(self.visual) + self.text


def _text_sample(tokens: int) -> Sample:
    reply = min(REPLY_TOKENS, max(1, tokens // 2))
    return Sample("text", (), (), (), False, max(tokens, reply + 1), reply)


def _sample(modality: str, room: int, geom: VisionGeometry, max_frames: int, anyres: bool,
            pool: int = DEFAULT_POOL, layout: str = DEFAULT_NEWLINE) -> Sample | None:
    """The largest sample of `modality` within `room` tokens, or None when not even the smallest fits."""
    text = PROMPT_TOKENS + REPLY_TOKENS
    visual_room = room - text
    if modality == "text":
        return _text_sample(room) if room > 1 else None
    if modality == "video":
        frames = max_frames
        while frames >= 1 and video_tokens(frames, geom, True, pool, layout) > visual_room:
            frames -= 1
        if frames < 1:
            return None
        return Sample("video", (video_tokens(frames, geom, True, pool, layout),), (frames,), (), False, text,
                      REPLY_TOKENS, pool, layout)
    crop = single_crop_tokens(geom)
    if modality == "multi_image":
        images = min(MAX_IMAGES, visual_room // crop)
        if images < 1:
            return None
        size = (geom.image_size, geom.image_size)
        return Sample("multi_image", (crop,) * images, (1,) * images, (size,) * images, False, text, REPLY_TOKENS)
    if not anyres:
        return Sample("single_image", (crop,), (1,), ((geom.image_size,) * 2,), False, text, REPLY_TOKENS) if visual_room >= crop else None
    scale = geom.image_size / 384
    for height, width in IMAGE_SIZES:
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        visual = anyres_tokens(h, w, geom)
        if visual <= visual_room:
            canvas_h, canvas_w = best_resolution(h, w, geom)
            crops = 1 + (canvas_h // geom.image_size) * (canvas_w // geom.image_size)
            return Sample("single_image", (visual,), (crops,), ((h, w),), True, text, REPLY_TOKENS)
    return None


def fill(tokens: int, shares: dict[str, float], geom: VisionGeometry, max_frames: int, anyres: bool,
         pool: int = DEFAULT_POOL, layout: str = DEFAULT_NEWLINE) -> list[Sample]:
    """Samples filling `tokens`: each modality's share with its largest samples, the remainder as text."""
    total = sum(shares.values())
    samples: list[Sample] = []
    for modality in FILL_ORDER:
        budget = int(tokens * shares.get(modality, 0.0) / total)
        while budget > 0:
            sample = _sample(modality, budget, geom, max_frames, anyres, pool, layout)
            if sample is None:
                break
            samples.append(sample)
            budget -= sample.tokens
    left = tokens - sum(s.tokens for s in samples)
    if left > 1 or not samples:
        samples.append(_text_sample(max(left, 2)))
    return samples


def rank_share(samples: list[Sample], degree: int, geom: VisionGeometry) -> list[Sample]:
    """What one rank of a sequence-parallel group of `degree` ranks holds of the group's samples (module docstring)."""
    if degree == 1:
        return samples
    out, images = [], 0
    for s in samples:
        text = -(-s.text // degree)
        reply = min(text - 1, -(-s.reply // degree)) if text > 1 else 1
        if s.modality == "video":
            frames = -(-s.crops[0] // degree)
            visual = video_tokens(frames, geom, True, s.pool, s.layout)
            out.append(Sample("video", (visual,), (frames,), (), False, max(text, 2), max(reply, 1), s.pool, s.layout))
        elif s.modality == "text":
            out.append(_text_sample(-(-s.tokens // degree)))
        else:
            if images % degree == 0:  # every degree-th image sample: the tower's share of the crops
                out.append(s)
            images += 1
    return out


def collated(samples: list[Sample], image_token: int, video_token: int, pixels) -> dict:
    """The batch collate() would hand the model: right-padded ids and labels, crops and frames from `pixels(n)`.

    Token ids other than the media placeholders are arbitrary (1): memory does not depend on them.
    """
    length = max(s.tokens for s in samples)
    ids = torch.zeros((len(samples), length), dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    image_crops, image_sizes, anyres, frames = [], [], [], []
    for i, s in enumerate(samples):
        placeholder = video_token if s.modality == "video" else image_token
        visual = sum(s.visual)
        prompt = s.text - s.reply
        ids[i, : s.tokens] = 1
        ids[i, prompt // 2 : prompt // 2 + visual] = placeholder
        labels[i, s.tokens - s.reply : s.tokens] = 1
        attention[i, : s.tokens] = 1
        if s.modality == "video":
            frames.append(s.crops[0])
        else:
            image_crops += s.crops
            image_sizes += s.image_sizes
            anyres += [s.anyres] * len(s.crops)
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": attention,
        "pixel_values": pixels(sum(image_crops)) if image_crops else None,
        "images_per_sample": [len(s.crops) if s.modality not in ("video", "text") else 0 for s in samples],
        "crops_per_image": image_crops,
        "image_sizes": torch.tensor(image_sizes, dtype=torch.long).view(-1, 2),
        "image_anyres": anyres,
        "video_frames": pixels(sum(frames)) if frames else None,
        "frames_per_video": frames,
        "video_pool": [s.pool for s in samples if s.modality == "video"],
        "video_layout": [s.layout for s in samples if s.modality == "video"],
        "modality": [s.modality for s in samples],
    }
