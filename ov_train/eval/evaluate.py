"""ov-eval's work: greedy replies of an export to held-out samples, scored per source and per modality.

Samples come from an ov-data shard directory (its val-*.tar shards, or every shard when it has none) or a
recipe's held-out split (each source's val-*.tar). Each sample's conversation up to its last reply goes
through the export's chat template and stock processor; the reply is greedy (`generate_replies`). Rows are
appended to predictions.jsonl as batches finish, so a rerun skips what is there; metrics.json is computed
from the file at the end.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from ov_train.data.recipe import load_recipe
from ov_train.data.stream import read_tar
from ov_train.eval.inference import (
    conversation_messages,
    export_placement,
    export_video,
    generate_replies,
    processor_inputs,
    sample_media,
    training_frames,
)
from ov_train.eval.metrics import DEFAULT_METRIC, check_metric, score, summarize
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import write_atomic

log = get_logger(__name__)

PREDICTIONS, METRICS = "predictions.jsonl", "metrics.json"
GENERATED_BY = "generated_by.json"  # what the rows of predictions.jsonl were generated with
RECORD_NAMES = {"export": "export", "weights": "export weights", "max_new_tokens": "--max-new-tokens",
                "max_frames": "--max-frames"}


@dataclass(frozen=True)
class EvalSource:
    name: str
    shards: tuple[str, ...]
    metric: str
    modality: str | None = None
    video: tuple[tuple[str, object], ...] = ()  # the recipe source's own video settings, as training read them


def eval_sources(data: str, root: str | Path | None, metric: str | None = None,
                 allow_pipe: bool = False) -> list[EvalSource]:
    """What DATA names: a shard directory (one source) or a recipe's sources with held-out shards (a recipe's
    `pipe:` commands only with `allow_pipe`, ov-eval's --allow-pipe)."""
    if metric is not None:
        check_metric(metric, "--metric")
    path = Path(data)
    if path.is_dir():
        shards = sorted(path.glob("val-*.tar")) or sorted(path.glob("*.tar"))
        if not shards:
            raise ValueError(f"{path}: no .tar shards (expected an ov-data shard directory)")
        return [EvalSource(path.name, tuple(map(str, shards)), metric or DEFAULT_METRIC)]
    recipe = load_recipe(data, root, require_shards=False, allow_pipe=allow_pipe, root_key="--root",
                         pipe_key="--allow-pipe")
    sources, videos = [], {spec.name: spec.video for spec in recipe.spec.sources}
    for s in recipe:
        if not s.val_shards:
            log.warning("source %s of recipe %s has no held-out shards (val-*.tar): not evaluated", s.name, recipe.name)
            continue
        chosen = metric or (check_metric(s.metric, f"recipe {recipe.name}: source {s.name}") if s.metric else DEFAULT_METRIC)
        sources.append(EvalSource(s.name, s.val_shards, chosen, s.modality, videos.get(s.name, ())))
    if not sources:
        raise ValueError(f"recipe {recipe.name}: no source has held-out shards (val-*.tar) under {root}")
    return sources


def generation_record(export: str | Path, max_new_tokens: int, max_frames: int | None) -> dict:
    """What a reply depends on besides its sample: the export (its path, its weight files' sizes and modification
    times, so a re-export or a longer run is told apart) and the generation settings."""
    export = Path(export).resolve()
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(export.glob("*.safetensors"))}
    return {"export": str(export), "weights": weights, "max_new_tokens": max_new_tokens, "max_frames": max_frames}


def claim_out_dir(out: str | Path, record: dict) -> None:
    """Record what this evaluation generates with, after checking that the predictions already in `out` were
    generated the same way: a rerun skips those samples, so another export's replies would pass for this one's."""
    out = Path(out)
    record_path = out / GENERATED_BY
    if (out / PREDICTIONS).is_file() and record_path.is_file():
        before = json.loads(record_path.read_text())
        changed = [RECORD_NAMES[k] for k in record if before.get(k) != record[k]]
        if changed:
            raise ValueError(
                f"{out / PREDICTIONS} holds replies generated with another {', '.join(changed)} ({record_path}); "
                "a rerun would count them as this export's: give another --out, or delete that directory"
            )
    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))


def held_out(sources: list[EvalSource], max_samples: int | None) -> Iterator[tuple[EvalSource, str, Callable[[], dict]]]:
    """(source, sample id, load) in order: every shard of each source, at most `max_samples` per source."""
    for source in sources:
        seen = 0
        for shard in source.shards:
            for sample in read_tar(shard):
                if max_samples is not None and seen >= max_samples:
                    break
                seen += 1
                yield source, f"{source.name}/{sample['__key__']}", partial(dict, sample)


def row_key(row: dict) -> str:
    """A row's `source/shard key` (rows written before ids were the user's have it as their id)."""
    return row.get("key", row["id"])


def read_rows(path: Path) -> list[dict]:
    """The rows of predictions.jsonl; a line cut short by a kill is dropped from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if whole != data:
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return [json.loads(line) for line in whole.decode().splitlines() if line.strip()]


def _modality(meta: dict, source: EvalSource, images: list, frames) -> str:
    if meta.get("modality"):
        return meta["modality"]
    if source.modality:
        return source.modality
    return "video" if frames is not None else {0: "text", 1: "single_image"}.get(len(images), "multi_image")


@dataclass
class Pending:
    """One sample waiting for its batch."""

    row: dict
    messages: list[dict]
    images: list
    frames: object

    @property
    def shape(self) -> tuple:
        # The processor batches images of any crop count, but videos only of one frame count.
        return bool(self.images), None if self.frames is None else len(self.frames)


class Evaluator:
    def __init__(self, processor, prompts, model, out_dir: Path, max_new_tokens: int, max_frames: int | None):
        self.processor, self.prompts, self.model = processor, prompts, model  # prompts: inference.ChatPrompts
        self.max_new_tokens, self.max_frames = max_new_tokens, max_frames
        self.video = export_video(model.config)  # the export's stage's frame sampling
        self.placement = export_placement(model.config)  # and its <image> placement
        self.path = Path(out_dir) / PREDICTIONS
        self.skipped: dict[str, int] = {}

    def pending(self, source: EvalSource, sample_id: str, raw: dict) -> Pending | None:
        try:
            meta = json.loads(raw["json"])
            messages, reference = conversation_messages(meta["conversations"], self.placement)
            video = replace(self.video, **dict(source.video))
            images, frames = sample_media(raw, replace(video, max_frames=self.max_frames or video.max_frames))
        except (KeyError, ValueError) as err:  # malformed json, no reply, unreadable media
            log.warning("skipping %s: %s", sample_id, err)
            reason = type(err).__name__
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
            return None
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        # `id` is the sample's own id (the user's, which convert keeps); `key` is where it is in the shards, unique
        # across sources: what reruns and metrics select rows by.
        row = {
            "id": str(meta.get("id") or raw.get("__key__")), "key": sample_id,
            "source": source.name, "modality": _modality(meta, source, images, frames),
            "prompt": prompt, "reference": reference, "options": meta.get("options") or [], "metric": source.metric,
        }
        frames = None if frames is None else training_frames(frames, self.model)
        return Pending(row, messages, images, frames)

    def run_batch(self, batch: list[Pending]) -> list[dict]:
        prompts = [self.prompts(p.messages) for p in batch]
        inputs = processor_inputs(self.processor, self.model, prompts, [p.images for p in batch], [p.frames for p in batch])
        replies = generate_replies(self.model, inputs, self.max_new_tokens)
        rows = []
        for p, ids in zip(batch, replies):
            prediction = self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            rows.append(scored({**p.row, "prediction": prediction}))
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        return rows


def scored(row: dict) -> dict:
    value = score(row["metric"], row["prediction"], row["reference"], row["options"])
    exact = score("exact_match", row["prediction"], row["reference"])
    return {**row, "score": value, "correct": value == 1.0, "exact_match": exact == 1.0}


def evaluate(processor, prompts, model, sources: list[EvalSource], out_dir: str | Path, max_samples: int | None = None,
             batch_size: int = 8, max_new_tokens: int = 128, max_frames: int | None = None, logger=None) -> dict:
    """Generate, score and write predictions.jsonl and metrics.json under `out_dir`; returns the metrics.
    (processor, prompts, model) are load_export's. `logger`, a Lightning logger (the run's), also gets the metrics
    and, for W&B, the predictions table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runner = Evaluator(processor, prompts, model, out, max_new_tokens, max_frames)
    done = {row_key(r) for r in read_rows(runner.path)}
    # A first pass reads only tar headers: the ids, for the progress bar and the metrics.
    selected = [sample_id for _, sample_id, _ in held_out(sources, max_samples)]
    batch: list[Pending] = []
    with tqdm(total=len(selected), desc="ov-eval", unit="sample", initial=sum(i in done for i in selected)) as bar:
        for source, sample_id, load in held_out(sources, max_samples):
            if sample_id in done:
                continue
            item = runner.pending(source, sample_id, load())
            if item is None:
                bar.update()
                continue
            if batch and (len(batch) >= batch_size or item.shape != batch[0].shape):
                runner.run_batch(batch)
                bar.update(len(batch))
                batch = []
            batch.append(item)
        if batch:
            runner.run_batch(batch)
            bar.update(len(batch))
    metrics = write_metrics(out, sources, set(selected), runner.skipped)
    if logger is not None:
        _log(logger, metrics, out)
    return metrics


def write_metrics(out: Path, sources: list[EvalSource], selected: set[str], skipped: dict | None = None) -> dict:
    """Rescore every row under this run's metric per source (a rerun may name another), rewrite the file
    atomically, and summarise the selected rows."""
    metric = {s.name: s.metric for s in sources}
    rows = [scored({**r, "metric": metric.get(r["source"], r["metric"])}) for r in read_rows(out / PREDICTIONS)]
    write_atomic(out / PREDICTIONS, "".join(json.dumps(r) + "\n" for r in rows))
    chosen = [r for r in rows if row_key(r) in selected]
    metrics = {
        "samples": len(chosen),
        "skipped": skipped or {},
        "score": sum(r["score"] for r in chosen) / max(len(chosen), 1),
        "exact_match": sum(r["exact_match"] for r in chosen) / max(len(chosen), 1),
        "by_source": summarize(chosen, "source"),
        "by_modality": summarize(chosen, "modality"),
    }
    (out / METRICS).write_text(json.dumps(metrics, indent=2))
    log.info("ov-eval: %d samples, score %.4f, exact match %.4f -> %s", len(chosen), metrics["score"],
             metrics["exact_match"], out)
    return metrics


def _log(logger, metrics: dict, out: Path) -> None:
    flat = {"eval/score": metrics["score"], "eval/exact_match": metrics["exact_match"]}
    for group in ("source", "modality"):
        for name, m in metrics[f"by_{group}"].items():
            flat[f"eval/{group}/{name}"] = m["score"]
    logger.log_metrics(flat)
    log_table = getattr(logger, "log_table", None)
    if log_table is not None:
        columns = ["id", "source", "modality", "prompt", "reference", "prediction", "score"]
        rows = read_rows(out / PREDICTIONS)
        log_table("eval/predictions", columns=columns, data=[[r[c] for c in columns] for r in rows])
    logger.save()
