"""`ov-data convert`: LLaVA data (JSON, JSONL, data YAML, parquet; conversations or preference pairs) -> WebDataset
shards, index.json, rejects.jsonl.

Shards are planned from the input order: chunk k holds input items [k*S, (k+1)*S) (S =
--samples-per-shard) and becomes `train-{k:06d}-000000.tar` (more pieces only when
--max-shard-bytes splits it) plus an index part `parts/part-{k:06d}.json`, written last. A chunk
whose part and shards all exist is finished, so a rerun on unchanged inputs converts only what is
missing (convert_state.py). Media references resolve inside --media-root, symlinks followed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ov_train.config.compose import compose
from ov_train.config.media import ImageSettings
from ov_train.config.options import IOSettings
from ov_train.constants import IMAGE_TOKEN, MEDIA_TOKENS, VIDEO_TOKEN
from ov_train.data.convert_state import SHARD_PREFIX, VAL_PREFIX, claim, finished, part_path
from ov_train.data.formats import InputError, Item, Reject, detect_format, is_preference, open_input
from ov_train.data.frame_extraction import FrameExtraction
from ov_train.data.inspect import summarise
from ov_train.data.pair_records import REJECTED, preference_texts, preference_turns
from ov_train.data.remote import is_remote, redact, remote_size, upload
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.video import VIDEO_FIELD, VideoDecodeError, decode_video_info
from ov_train.utils.paths import cache_dir, write_atomic
from ov_train.vision.geometry import VisionGeometry
from ov_train.vision.pooling import DEFAULT_NEWLINE, DEFAULT_POOL
from ov_train.vision.tokens import (
    anyres_tokens,
    single_crop_tokens,
    video_frame_indices,
    video_tokens,
)

# Token counts in the index are for the real OneVision geometry, read from these shipped configs
# (SigLIP-384/14, anyres_max_9, at most 32 video frames).
TOKEN_MODEL, TOKEN_STAGE = "ov_qwen2_0_5b", "onevision"
_IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_MEDIA = re.compile("|".join(re.escape(t) for t in MEDIA_TOKENS))
_HUMAN, _GPT = {"human", "user"}, {"gpt", "assistant"}


@dataclass(frozen=True)
class TokenGeometry:
    """What visual token counts depend on: the vision geometry, the most frames sampled from a video, and how a
    video's frames are pooled and laid out (stage.video_pool, stage.video_newline)."""

    vision: VisionGeometry
    max_frames: int
    pool: int = DEFAULT_POOL
    newline: str = DEFAULT_NEWLINE

    @classmethod
    def of_configs(cls, model: str = TOKEN_MODEL, stage: str = TOKEN_STAGE, reproduce: str = "ov_train") -> TokenGeometry:
        """The shipped model and stage configs' geometry; `reproduce` (stage.reproduce) picks how anyres unpadding
        rounds (config/reproduce.py), as training under that setting counts."""
        cfg = compose([f"model={model}", f"stage={stage}", f"stage.reproduce={reproduce}"])
        vision = cfg.model.vision
        geometry = VisionGeometry.of(vision.image_size, vision.patch_size, cfg.model.vision_aspect_ratio,
                                     ImageSettings.from_stage(cfg.stage).rounding)
        return cls(geometry, cfg.stage.max_frames, cfg.stage.video_pool, cfg.stage.video_newline)

    def index_fields(self) -> dict:
        """The `geometry` an index records its token counts at."""
        return {"image_size": self.vision.image_size, "patch_size": self.vision.patch_size,
                "max_crops": self.vision.max_crops, "max_frames": self.max_frames,
                "token_rounding": self.vision.rounding, "video_pool": self.pool, "video_newline": self.newline}


@functools.cache
def shipped_token_geometry(reproduce: str = "ov_train") -> TokenGeometry:
    """TokenGeometry.of_configs(reproduce=...), read once per process and setting."""
    return TokenGeometry.of_configs(reproduce=reproduce)


# ---------------------------------------------------------------- media references


@dataclass(frozen=True)
class MediaRoot:
    """The folder media references are read from; `contained`: a reference must resolve inside it."""

    path: Path  # resolved
    contained: bool = True

    def read(self, ref: str, reason: str) -> bytes:
        """The bytes of a media reference; Reject(outside_media_root) when it resolves (symlinks followed,
        `..` and absolute paths included) outside the root, Reject(reason) when it cannot be read."""
        try:
            path = Path(os.path.realpath(self.path / ref))
        except ValueError as err:  # an embedded NUL byte
            raise Reject(reason, f"{ref!r}: {err}") from err
        if self.contained and not path.is_relative_to(self.path):
            raise Reject("outside_media_root", f"{ref!r} resolves to {path}, outside --media-root {self.path} "
                                               "(--allow-outside-root reads it)")
        try:
            # NOFOLLOW: a file swapped for a symlink after the check is not followed; NONBLOCK: no FIFO hangs us.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise Reject(reason, f"{path}: not a regular file")
                return f.read()
        except OSError as err:
            raise Reject(reason, f"{path}: {err.strerror or err}") from err


# ---------------------------------------------------------------- one record -> one shard sample


def build_sample(item: Item, key: str, media: MediaRoot, tokens: TokenGeometry,
                 frames: FrameExtraction | None = None) -> tuple[dict, dict]:
    """Validate a record and load its media; returns (shard sample, index entry) or raises Reject. `frames`: a video
    is stored as its extracted frames."""
    if item.error:
        raise Reject("malformed_line", item.error)
    record = item.record
    if not isinstance(record, dict):
        raise Reject("malformed_line", f"expected a JSON object, got {type(record).__name__}")
    preference = is_preference(record)
    conversations = None if preference else _conversation(record.get("conversations"))
    image_refs, video_ref = _media_refs(record)
    if image_refs and video_ref:
        raise Reject("mixed_media", "a record with both images and a video is not supported")
    n_images = len(item.image_bytes) if item.image_bytes is not None else len(image_refs)
    if preference:  # the prompt and the chosen reply, checked as a conversation; the rejected reply beside
        turns, rejected = preference_turns(record, n_images, video_ref is not None)
        conversations = _conversation(turns)
    conversations = _check_placeholders(conversations, n_images, video_ref is not None)

    sample = {"__key__": key}
    entry = {"key": key, "id": item_id(item), "source": item.source}
    if video_ref:
        entry.update(_add_video(sample, media.read(video_ref, "missing_video"), video_ref, tokens, frames))
    elif n_images:
        if item.image_bytes is not None:
            payloads = [(data, f"{item.where} image {i}") for i, data in enumerate(item.image_bytes)]
        else:
            payloads = [(media.read(ref, "missing_image"), ref) for ref in image_refs]
        entry.update(_add_images(sample, payloads, tokens.vision))
    else:
        entry.update(modality="text", visual_tokens=0)

    meta = {"id": entry["id"], "modality": entry["modality"], "conversations": conversations, "source": item.source}
    if preference:
        meta[REJECTED] = rejected
        entry["pair"] = True
    if video_ref:
        meta["video_container"] = entry["video"]["container"]
        if "extracted" in entry["video"]:
            meta["video_frames"] = entry["video"]["extracted"]
    meta.update({k: record[k] for k in ("task", "options", "answer") if k in record})
    sample["json"] = meta
    return sample, entry


def _add_images(sample: dict, payloads: list[tuple[bytes, str]], geometry: VisionGeometry) -> dict:
    """Store images under img<i>.<ext> with their original bytes; index fields for them."""
    sizes = []
    for i, (data, name) in enumerate(payloads):
        ext, height, width = _image_info(data, name)
        sample[f"img{i}.{ext}"] = data
        sizes.append([height, width])
    if len(sizes) == 1:
        return {"modality": "single_image", "images": sizes, "visual_tokens": anyres_tokens(*sizes[0], geometry)}
    return {"modality": "multi_image", "images": sizes, "visual_tokens": len(sizes) * single_crop_tokens(geometry)}


def _add_video(sample: dict, data: bytes, name: str, tokens: TokenGeometry, frames: FrameExtraction | None = None) -> dict:
    """Store the video under VIDEO_FIELD (or, with `frames`, its extracted frames); index fields for it, its
    container named by the file's extension."""
    total, fps, duration = _video_info(data, name, tokens.max_frames)
    sampled = len(video_frame_indices(total, fps, tokens.max_frames))
    video = {"frames": total, "fps": round(fps, 3), "duration": round(duration, 3), "sampled_frames": sampled,
             "container": Path(name).suffix.lower().lstrip(".") or None}
    if frames is None:
        sample[VIDEO_FIELD] = data
    else:
        try:
            members, video["extracted"] = frames.extract(data, name)
        except VideoDecodeError as err:
            raise Reject("corrupt_video", str(err)) from err
        sample.update(members)
        sampled = video["sampled_frames"] = min(video["extracted"]["frames"], tokens.max_frames)
    return {"modality": "video", "video": video, "visual_tokens": video_tokens(sampled, tokens.vision, True, tokens.pool,
                                                                                  tokens.newline)}


def item_id(item: Item) -> str:
    record = item.record
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return item.where


def _conversation(turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise Reject("empty_conversation", "no conversation turns")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise Reject("malformed_conversation", "every turn needs 'from' and a string 'value'")
    speakers = {t.get("from") for t in turns}
    for side, names in (("human", _HUMAN), ("gpt", _GPT)):
        if not speakers & names:
            raise Reject("one_sided_conversation", f"no {side} turn (speakers: {sorted(map(str, speakers))})")
    return turns


def _media_refs(record: dict) -> tuple[list[str], str | None]:
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    video = record.get("video")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise Reject("malformed_record", f"'image' must be a path or a list of paths, got {record.get('image')!r}")
    if video is not None and not (isinstance(video, str) and video):
        raise Reject("malformed_record", f"'video' must be a path, got {video!r}")
    return images, video


def _check_placeholders(turns: list[dict], n_images: int, has_video: bool) -> list[dict]:
    texts = [t["value"] for t in turns]
    n_image_ph = sum(t.count(IMAGE_TOKEN) for t in texts)
    n_video_ph = sum(t.count(VIDEO_TOKEN) for t in texts)
    if has_video and n_video_ph == 0 and n_image_ph == 1:
        # LLaVA-Video style data marks the video with <image>; training expects <video>.
        turns = [{**t, "value": t["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)} for t in turns]
        n_image_ph, n_video_ph = 0, 1
    expected = (0, 1) if has_video else (n_images, 0)
    if (n_image_ph, n_video_ph) != expected:
        raise Reject("placeholder_mismatch", f"{n_image_ph} <image> and {n_video_ph} <video> placeholder(s) "
                                             f"for {n_images} image(s) and {int(has_video)} video(s)")
    return turns


def _image_info(data: bytes, name: str) -> tuple[str, int, int]:
    """(extension, height, width) of an image that fully decodes; corrupt_image otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        # verify() checks structure only and leaves the image unusable: decode for real from a fresh handle.
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            height, width = im.height, im.width
    except UnidentifiedImageError as err:
        raise Reject("corrupt_image", f"{name}: not an image file PIL recognises") from err
    except Exception as err:  # PIL raises many types for broken files
        raise Reject("corrupt_image", f"{name}: {err}") from err
    return _IMAGE_EXTENSIONS.get(fmt, str(fmt).lower()), height, width


def _video_info(data: bytes, name: str, max_frames: int) -> tuple[int, float, float]:
    """(frames, fps, duration) of a video whose sampled frames all decode; corrupt_video otherwise."""
    try:
        _, duration, frames, fps = decode_video_info(data, max_frames, name=name)
        return frames, fps, duration
    except VideoDecodeError as err:
        raise Reject("corrupt_video", str(err)) from err


# ---------------------------------------------------------------- chunks: one per planned shard


@dataclass(frozen=True)
class ConvertSettings:
    """What every chunk's writer needs (pickled to the worker processes)."""

    out_dir: str
    media: MediaRoot
    samples_per_shard: int
    max_shard_bytes: int
    tokens: TokenGeometry
    held_out: frozenset = frozenset()  # input positions that go to the held-out (val-*) shards
    video_frames: FrameExtraction | None = None  # videos stored as their sampled frames (--video-frames)


@dataclass
class Chunk:
    index: int
    first: int  # input position of its first item; keys are input positions
    items: list[Item]
    text_tokens: list[int]


def write_chunk(plan: ConvertSettings, chunk: Chunk) -> int:
    """Write one chunk's shard(s) (train, and val for its held-out items), then its index part; returns the
    number of input items handled."""
    out = Path(plan.out_dir)
    entries, pieces, rejects = [], [], []
    writers = {split: ShardWriter(out, f"{split}-{chunk.index:06d}", plan.samples_per_shard, plan.max_shard_bytes)
               for split in (SHARD_PREFIX, VAL_PREFIX)}
    with writers[SHARD_PREFIX], writers[VAL_PREFIX]:
        for offset, (item, text_tokens) in enumerate(zip(chunk.items, chunk.text_tokens)):
            try:
                sample, entry = build_sample(item, f"{chunk.first + offset:09d}", plan.media, plan.tokens,
                                             plan.video_frames)
            except Reject as rej:
                rejects.append({"id": item_id(item), "reason": rej.reason, "detail": rej.detail, "where": item.where})
                continue
            split = VAL_PREFIX if chunk.first + offset in plan.held_out else SHARD_PREFIX
            writers[split].write(sample)
            entry["text_tokens"] = text_tokens
            if split == VAL_PREFIX:
                entry["split"] = VAL_PREFIX
            entries.append(entry)
            pieces.append((split, len(writers[split].shards)))  # the shard being written is the next to finish
    for entry, (split, piece) in zip(entries, pieces):
        entry["shard"] = writers[split].shards[piece]
    shards = writers[SHARD_PREFIX].shards + writers[VAL_PREFIX].shards
    part = {"chunk": chunk.index, "shards": shards, "samples": entries, "rejects": rejects}
    write_atomic(part_path(out, chunk.index), json.dumps(part, ensure_ascii=False))
    return len(chunk.items)


def held_out_positions(holdout: int | float | None, total: int, seed: int) -> frozenset:
    """The input positions of a deterministic held-out split: `holdout` items (a count, or a fraction of the
    input), drawn with --seed. Rejected items among them leave the split smaller."""
    if not holdout:
        return frozenset()
    count = holdout if isinstance(holdout, int) else round(holdout * total)
    if not 1 <= count < total:
        raise InputError(f"--holdout {holdout} takes {count} of the input's {total} items; "
                         "it must leave at least one for training and take at least one")
    return frozenset(random.Random(f"holdout/{seed}").sample(range(total), count))


def _record_texts(record) -> list[str]:
    """A record's turn texts (a preference record's: its prompt's turns and both replies)."""
    if is_preference(record):
        return preference_texts(record)
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return []
    return [t["value"] for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def text_token_counts(tokenizer, items: list[Item]) -> list[int]:
    """Tokens of each record's turn texts with the media placeholders removed (0 for malformed records)."""
    owners, texts = [], []
    for i, item in enumerate(items):
        for text in _record_texts(item.record):
            owners.append(i)
            texts.append(_MEDIA.sub("", text))
    counts = [0] * len(items)
    if texts:
        # split_special_tokens: like the training template, data text never becomes special tokens.
        for i, ids in zip(owners, tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]):
            counts[i] += len(ids)
    return counts


def _chunks(items: Iterator[Item], plan: ConvertSettings, tokenizer, stats: dict, bar) -> Iterator[Chunk]:
    """The chunks still to write, in input order; finished ones are counted and skipped."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == plan.samples_per_shard:
            yield from _pending(batch, plan, tokenizer, stats, bar)
            batch = []
    if batch:
        yield from _pending(batch, plan, tokenizer, stats, bar)


def _pending(batch: list[Item], plan: ConvertSettings, tokenizer, stats: dict, bar) -> Iterator[Chunk]:
    index = stats["chunks"]
    stats["chunks"] += 1
    if finished(Path(plan.out_dir), index):
        stats["resumed"] += 1
        bar.update(len(batch))
        return
    yield Chunk(index, index * plan.samples_per_shard, batch, text_token_counts(tokenizer, batch))


def _run(plan: ConvertSettings, chunks: Iterator[Chunk], workers: int) -> Iterator[int]:
    if workers <= 1:
        for chunk in chunks:
            yield write_chunk(plan, chunk)
        return
    # spawn: workers start clean instead of forking the tokenizer's threads.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        pending: set = set()
        try:
            for chunk in chunks:
                pending.add(pool.submit(write_chunk, plan, chunk))
                # Only a few chunks in flight: parquet chunks carry their image bytes.
                if len(pending) >= 2 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in done)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent: int) -> None:
    """Worker initializer: the worker dies with the convert process, even a SIGKILL'd one (whose pool
    would otherwise wait forever on its call queue, keeping the resource tracker alive too)."""
    try:
        # Linux: the kernel sends SIGKILL when the thread that spawned us exits (_run's, which owns the pool).
        armed = sys.platform == "linux" and ctypes.CDLL(None, use_errno=True).prctl(
            _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
    if os.getppid() != parent:  # it died before we were armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# ---------------------------------------------------------------- the whole conversion


def _load_tokenizer(path: str | None):
    # transformers is slow to import and only the main process counts text tokens.
    from ov_train.text.tokenizer import build_tiny_tokenizer, load_tokenizer

    if path:
        if not Path(path).is_dir():
            raise InputError(f"--tokenizer {path} is not a folder")
        try:
            return load_tokenizer(path)
        except (OSError, ValueError) as err:
            raise InputError(f"--tokenizer {path}: cannot load a tokenizer there ({err})") from err
    return build_tiny_tokenizer(cache_dir() / "tokenizer")


def _merge(out: Path, settings: dict, chunks: int, tokens: TokenGeometry) -> dict:
    parts = [json.loads(part_path(out, k).read_text(encoding="utf-8")) for k in range(chunks)]
    samples = [entry for part in parts for entry in part["samples"]]
    rejects = [rej for part in parts for rej in part["rejects"]]
    splits = {split: sum(e.get("split", SHARD_PREFIX) == split for e in samples) for split in (SHARD_PREFIX, VAL_PREFIX)}
    totals = {**summarise(samples, rejects), "splits": splits}
    index = {
        "settings": settings,
        "geometry": tokens.index_fields(),
        "totals": totals,
        "shards": [shard for part in parts for shard in part["shards"]],
        "samples": samples,
    }
    write_atomic(out / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    write_atomic(out / "index.json", json.dumps(index, ensure_ascii=False))
    return totals


def _readable(path: Path, what: str, is_dir: bool) -> Path:
    kind_ok = path.is_dir() if is_dir else path.is_file()
    if not kind_ok or not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        state = "does not exist" if not path.exists() else "is not a readable " + ("folder" if is_dir else "file")
        raise InputError(f"{what} {path} {state}")
    return path


def convert(input_path, out_dir, media_root=None, fmt: str | None = None, samples_per_shard: int = 1000,
            max_shard_bytes: int = 1 << 30, workers: int = 1, seed: int = 0, tokenizer: str | None = None,
            allow_outside_root: bool = False, holdout: int | float | None = None,
            io: IOSettings = IOSettings(), reproduce: str = "ov_train",
            video_frames: FrameExtraction | None = None) -> dict:
    """Convert INPUT into shards + index under out_dir (a folder, or a remote location the finished files are
    uploaded to whole); returns the totals, chunk counts and why an earlier run's chunks were dropped
    (`restarted`, None when they were not). `video_frames`: store videos as their sampled frames
    (data/frame_extraction.py)."""
    input_path = _readable(Path(input_path).resolve(), "INPUT", is_dir=False)
    media_root = _readable(Path(media_root or input_path.parent).resolve(), "--media-root", is_dir=True)
    fmt = detect_format(input_path, fmt)
    source = open_input(input_path, fmt, seed)
    out = staging_dir(str(out_dir)) if is_remote(str(out_dir)) else Path(out_dir)
    settings = {"input": str(input_path), "format": fmt, "media_root": str(media_root), "seed": seed,
                "samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
                "allow_outside_root": allow_outside_root}
    if holdout:
        settings["holdout"] = holdout
    if reproduce != "ov_train":  # the token counts follow the public code's rounding (config/reproduce.py)
        settings["reproduce"] = reproduce
    if video_frames:
        settings["video_frames"] = asdict(video_frames)
    held_out = held_out_positions(holdout, source.total, seed)
    restarted = claim(out, settings, source.files)
    tokens = shipped_token_geometry(reproduce)
    plan = ConvertSettings(str(out), MediaRoot(media_root, not allow_outside_root), samples_per_shard, max_shard_bytes,
                           tokens, held_out, video_frames)
    stats = {"chunks": 0, "resumed": 0}
    with tqdm(total=source.total, unit="sample", desc="ov-data convert", disable=None) as bar:
        chunks = _chunks(source.items, plan, _load_tokenizer(tokenizer), stats, bar)
        for handled in _run(plan, chunks, workers):
            bar.update(handled)
    totals = _merge(out, settings, stats["chunks"], tokens)
    if is_remote(str(out_dir)):
        publish(out, str(out_dir), io)
    return {**totals, "chunks": stats["chunks"], "resumed_chunks": stats["resumed"], "restarted": restarted}


def staging_dir(location: str) -> Path:
    """Where a conversion to a remote location is written (and resumed) before its files are uploaded."""
    digest = hashlib.sha256(redact(location).encode()).hexdigest()[:16]
    return cache_dir() / "convert-staging" / digest


def publish(staged: Path, location: str, io: IOSettings) -> None:
    """Upload a finished conversion: each shard whole (those already there at full size are kept), then
    rejects.jsonl, then index.json last, so a reader that finds the index finds every shard it names."""
    index = json.loads((staged / "index.json").read_text(encoding="utf-8"))
    names = index["shards"] + ["rejects.jsonl", "index.json"]
    with tqdm(total=len(names), unit="file", desc=f"upload to {redact(location)}", disable=None) as bar:
        for name in names:
            local, target = staged / name, location.rstrip("/") + "/" + name
            if name.endswith(".tar") and remote_size(target, io) == local.stat().st_size:
                bar.update(1)
                continue
            upload(local, target, io)
            bar.update(1)

