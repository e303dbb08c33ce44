"""One raw shard sample (LLaVA json + media bytes) -> one model-ready example: pixels, ids, labels."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property

import torch

from ov_train.config.media import MediaSettings
from ov_train.constants import IGNORE_INDEX, MEDIA_TOKENS
from ov_train.data.frame_extraction import frame_fields, read_frames
from ov_train.data.video import VIDEO_FIELD, decode_video
from ov_train.text.template import encode_conversation
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL
from ov_train.vision.preprocess import open_image, preprocess_frames, preprocess_image
from ov_train.vision.tokens import video_frame_indices, video_tokens

# Where a sample's video is, in order: the one field `ov-data convert` writes, then the container extensions
# that older converted shards used and synthetic shards still use (`mp4`).
VIDEO_FIELDS = (VIDEO_FIELD, "mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "flv", "wmv", "3gp", "ts", "ogv")


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# An image field: img0.jpg, img1.png, ... (convert writes img{N}.{ext}); N orders a sample's images.
_IMAGE_FIELD = re.compile(r"img(\d+)(\..*)?")
# A json member holds the conversation, escaped (a character outside the BMP is 12 bytes of \uXXXX\uXXXX), and
# the sample's other fields; one larger than this per character the conversation may have, plus the slack, is
# passed over unread.
JSON_BYTES_PER_CHAR, JSON_SLACK = 12, 1 << 20


def image_fields(raw: dict) -> list[str]:
    """A raw sample's image fields in image order; SampleError `bad_media_name` for an img* field without its
    number (f1.imgx.png, f1.img.png): no order could place it."""
    numbers = {}
    for field in raw:
        if field.startswith("img"):
            match = _IMAGE_FIELD.fullmatch(field)
            if match is None:
                raise SampleError("bad_media_name", f"sample {raw.get('__key__', '?')}: member field {field!r} is not"
                                                    " imgN.EXT (N: the image's number, as convert writes it)")
            numbers[field] = int(match.group(1))
    return sorted(numbers, key=numbers.get)


def text_chars(conversations) -> int:
    """Characters of a conversation's text values (what tokenizing costs)."""
    if not isinstance(conversations, list):
        return 0
    return sum(len(t["value"]) for t in conversations if isinstance(t, dict) and isinstance(t.get("value"), str))


@dataclass(frozen=True)
class SampleProcessor:
    tokenizer: object
    geometry: object
    template: str
    media: MediaSettings  # the stage's image and video settings (the plan's SamplePlan.media; MediaSettings.of)
    max_length: int
    # Where a turn's single <image>/<video> goes (constants.PLACEMENTS): `front` (moved to the start, then a
    # newline, as the public LLaVA-NeXT code does) or `as_is`.
    placement: str = "front"
    # Labels and the plain template's newline (config/reproduce.py): ov_train's, or the public code's.
    labels: str = "replies"
    plain_newline: str = "apart"
    # data.decode (constants.DECODES): `exact` decodes and resizes with PIL, as the reference processor does; `fast`
    # decodes a JPEG at the reduced size its crops need and, with torchvision installed, resizes images and video
    # frames with its kernels (vision/pixels.py): faster, pixels not equal.
    decode: str = "exact"

    @cached_property
    def token_chars(self) -> int:
        """Characters one token stands for at most: twice the tokenizer's longest vocabulary entry. A byte-level
        BPE token (Qwen2's) covers at most its entry's bytes, and a character takes at least one byte, except that
        NFC normalisation composes at most 3 characters into a 2-byte one; hence the factor 2."""
        return 2 * max(len(entry) for entry in self.tokenizer.get_vocab())

    @property
    def max_text_chars(self) -> int:
        """A conversation longer than this has more than max_length tokens whatever it says: it is skipped
        (too_long_text) rather than tokenized whole and cut."""
        return self.max_length * self.token_chars

    @property
    def member_limits(self) -> dict[str, int]:
        """Bytes a shard member may have for a sample of max_length tokens, by field: the readers pass larger
        ones over unread (data/sources.py), counted as oversized_<field>."""
        return {"json": JSON_BYTES_PER_CHAR * self.max_text_chars + JSON_SLACK}

    def __call__(self, raw: dict) -> dict:
        key = raw.get("__key__", "?")
        if "__skip__" in raw:  # a parquet row that the conversion checks reject (parquet_source.row_sample)
            raise SampleError(raw["__skip__"], f"sample {key}: {raw.get('__detail__', raw['__skip__'])}")
        limit = self.member_limits["json"]
        if isinstance(raw.get("json"), (bytes, str)) and len(raw["json"]) > limit:  # read whole (a parquet row)
            raise SampleError("oversized_json", f"sample {key}: json of {len(raw['json']):,} bytes is over the"
                                                f" {limit:,} a sample of stage.max_length={self.max_length} may hold")
        try:
            meta = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            raise SampleError("malformed_json", f"sample {key}: bad or missing json ({err})") from err
        if not isinstance(meta, dict):
            raise SampleError("malformed_json", f"sample {key}: json is a {type(meta).__name__}, not an object")
        self.check_text(key, meta.get("conversations"))  # before any media is decoded
        fields = image_fields(raw)
        mode = self.media.image.crop_mode(len(fields))
        images = []
        for field in fields:
            try:
                im, size = open_image(raw[field], self.geometry, mode, fast=self.decode == "fast")
                images.append(preprocess_image(im, self.geometry, mode=mode, size=size))
            except Exception as err:  # PIL raises many types for broken files
                raise SampleError("corrupt_image", f"sample {key}: cannot decode {field} ({err})") from err
        frames = None
        visual = [img.num_tokens for img in images]
        video_field = next((f for f in VIDEO_FIELDS if f in raw), None)
        extracted = frame_fields(raw)  # a video stored as its frames (ov-data convert --video-frames)
        if video_field or extracted:
            video = self.media.video_for(raw.get("__source__"))  # the stream names the sample's source
            try:
                if video_field:
                    array, _ = decode_video(raw[video_field], video.max_frames, f"{key}.{video_field}", video.fps,
                                            video.sampling, video.frame_size)
                else:  # sampled again at the stage's rate and cap, over the rate they were stored at
                    array = read_frames(raw, extracted)
                    rate = float((meta.get("video_frames") or {}).get("fps", 1.0))
                    array = array[video_frame_indices(len(array), rate, video.max_frames, video.fps, video.sampling)]
            except Exception as err:  # decoders raise ValueError; PIL many types for a broken frame
                raise SampleError("corrupt_video", str(err) if video_field else f"sample {key}: frames: {err}") from err
            frames = preprocess_frames(array, self.geometry, fast=self.decode == "fast")
            visual.append(video_tokens(frames.shape[0], self.geometry, self.media.image.newline, video.pool, video.newline))
        ids, labels = self.encode(key, meta.get("conversations"), visual)
        options = meta.get("options") if isinstance(meta.get("options"), list) else []
        return {
            "key": key,
            "modality": meta.get("modality", "text"),
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": images,
            "frames": frames,
            "visual_tokens": visual,  # per image, then the video: what another conversation on these media needs
            "video_newline": self.media.image.newline,
            # How the model lays the video's features out (stage.video_pool / video_newline, or its source's).
            "video_pool": video.pool if video_field else None,
            "video_layout": video.newline if video_field else None,
            "chance": 1.0 / len(options) if options else 0.0,
        }

    def check_text(self, key: str, conversations) -> None:
        chars = text_chars(conversations)
        if chars > self.max_text_chars:
            raise SampleError("too_long_text", f"sample {key}: {chars:,} characters of text are over"
                                               f" {self.max_text_chars:,}, more than stage.max_length={self.max_length}"
                                               f" tokens at {self.token_chars} characters per token at most")

    def encode(self, key: str, conversations, visual: list[int]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a conversation whose media take `visual` tokens each, cut to max_length."""
        self.check_text(key, conversations)
        try:
            enc = encode_conversation(self.tokenizer, conversations, self.template, visual, self.placement,
                                      self.labels, self.plain_newline)
        except (KeyError, ValueError, TypeError, AttributeError) as err:  # not a list of {from, value} turns
            raise SampleError("bad_conversation", f"sample {key}: {err}") from err
        return self._truncate(key, enc.input_ids, enc.labels)

    def _truncate(self, key, ids, labels):
        if len(ids) <= self.max_length:
            return ids, labels
        media = {self.tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS}
        if any(t in media for t in ids[self.max_length :]):
            # Cutting through visual tokens would orphan features, so such samples are dropped.
            raise SampleError("too_long", f"sample {key}: {len(ids)} tokens, visual tokens beyond max_length {self.max_length}")
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise SampleError("no_supervised_tokens", f"sample {key}: truncation to {self.max_length} removed every answer token")
        return ids, labels


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad ids/labels; concatenate all crops and frames in sample order."""
    length = max(len(e["input_ids"]) for e in examples)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((batch_size, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n], labels[i, :n], attention[i, :n] = e["input_ids"], e["labels"], 1
    images = [img for e in examples for img in e["images"]]
    videos = [e["frames"] for e in examples if e["frames"] is not None]
    skipped: dict[str, int] = {}
    for e in examples:
        for reason, n in e.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "pixel_values": torch.cat([img.pixel_values for img in images]) if images else None,
        "images_per_sample": [len(e["images"]) for e in examples],
        "crops_per_image": [img.pixel_values.shape[0] for img in images],
        "image_sizes": torch.tensor([img.size for img in images], dtype=torch.long).view(-1, 2),
        "image_anyres": [img.anyres for img in images],
        "image_newline": [img.newline for img in images],
        "video_frames": torch.cat(videos) if videos else None,
        "frames_per_video": [v.shape[0] for v in videos],
        "video_newline": [e.get("video_newline", True) for e in examples if e["frames"] is not None],
        "video_pool": [e.get("video_pool") or DEFAULT_POOL for e in examples if e["frames"] is not None],
        "video_layout": [e.get("video_layout") or DEFAULT_NEWLINE for e in examples if e["frames"] is not None],
        "modality": [e["modality"] for e in examples],
        # Floats, not a tensor: under bf16-true Lightning casts the batch's float tensors to bf16 (1/3 -> 0.334).
        "chance": [e["chance"] for e in examples],
        "skipped": skipped,
    }


def stock_inputs(batch: dict) -> dict:
    """A collated batch as keyword arguments of the stock LlavaOnevisionForConditionalGeneration.forward
    (labels left out). It takes videos as one (videos, frames, C, H, W) tensor, so their frame counts
    must agree."""
    frames, frame_counts = batch["video_frames"], batch["frames_per_video"]
    if len(set(frame_counts)) > 1:
        raise ValueError(f"the stock forward needs videos of one frame count, got {frame_counts}")
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": batch["pixel_values"],
        "image_sizes": batch["image_sizes"],
        "batch_num_images": torch.tensor(batch["images_per_sample"]),
        "pixel_values_videos": None if frames is None else frames.view(len(frame_counts), -1, *frames.shape[1:]),
    }
