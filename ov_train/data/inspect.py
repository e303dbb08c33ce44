"""`ov-data inspect DIR`: what a converted folder holds, read from its index.json and rejects.jsonl."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from ov_train.config.options import IOSettings
from ov_train.constants import MODALITIES
from ov_train.data.remote import read_bytes, redact, redact_text

PERCENTILES = (50, 90, 99)


def percentiles(values: list[int]) -> dict:
    """Nearest-rank p50/p90/p99 and the max: always values some sample really has."""
    ordered = sorted(values)
    if not ordered:
        return {f"p{p}": 0 for p in PERCENTILES} | {"max": 0}
    stats = {f"p{p}": ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] for p in PERCENTILES}
    return stats | {"max": ordered[-1]}


def summarise(samples: list[dict], rejects: list[dict]) -> dict:
    """Counts and token statistics of index entries (visual tokens at the geometry the index was made for)."""
    text = [s["text_tokens"] for s in samples]
    visual = [s["visual_tokens"] for s in samples]
    by_modality = Counter(s["modality"] for s in samples)
    tokens_by_modality = {m: {"text": 0, "visual": 0} for m in MODALITIES}
    for s in samples:
        tokens_by_modality[s["modality"]]["text"] += s["text_tokens"]
        tokens_by_modality[s["modality"]]["visual"] += s["visual_tokens"]
    return {
        "samples": len(samples),
        # The split `--holdout` wrote to val-*.tar (index entries carry their split; training shards otherwise).
        "held_out": sum(1 for s in samples if s.get("split") == "val"),
        "pairs": sum(1 for s in samples if s.get("pair")),  # preference samples: a prompt, a chosen and a rejected reply
        "by_modality": {m: by_modality[m] for m in MODALITIES},
        "text_tokens": sum(text),
        "visual_tokens": sum(visual),
        "tokens_by_modality": tokens_by_modality,
        "percentiles": {"text_tokens": percentiles(text), "visual_tokens": percentiles(visual)},
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
    }


def inspect_dir(location: str | Path, io: IOSettings = IOSettings()) -> dict:
    """What a converted folder (its index.json and rejects.jsonl) or an `ov-data index` file holds; local or remote."""
    location = str(location)
    index_file = location if location.endswith(".json") else location.rstrip("/") + "/index.json"
    try:
        index = json.loads(read_bytes(index_file, io).decode("utf-8"))
    except OSError as err:
        raise FileNotFoundError(f"{redact(location)}: no readable index.json ({redact_text(err.strerror or err)}); "
                                "is it an `ov-data convert` output folder or an `ov-data index` file?") from err
    rejects = index.get("rejects")
    if rejects is None:
        try:
            lines = read_bytes(index_file.rsplit("/", 1)[0] + "/rejects.jsonl", io).decode("utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        rejects = [json.loads(line) for line in lines if line.strip()]
    return {"dir": redact(location), "shards": len(index["shards"]), **summarise(index["samples"], rejects)}


def format_report(stats: dict) -> str:
    """A readable table of summarise()'s output."""
    lines = [f"{stats['samples']:,} samples" + (f" in {stats['shards']:,} shards" if "shards" in stats else "")]
    held = stats.get("held_out", 0)
    lines.append(f"held out: {held:,} in val-*.tar, {stats['samples'] - held:,} for training in train-*.tar" if held
                 else "held out: none (`ov-data convert --holdout N` writes a held-out split)")
    if stats.get("pairs"):
        lines.append(f"of which {stats['pairs']:,} preference pairs (text tokens count the prompt and both replies)")
    lines.append("")
    lines.append(f"{'modality':<14}{'samples':>10}{'text tokens':>15}{'visual tokens':>16}")
    for m in MODALITIES:
        tokens = stats["tokens_by_modality"][m]
        lines.append(f"{m:<14}{stats['by_modality'][m]:>10,}{tokens['text']:>15,}{tokens['visual']:>16,}")
    lines.append(f"{'total':<14}{stats['samples']:>10,}{stats['text_tokens']:>15,}{stats['visual_tokens']:>16,}")
    lines += ["", f"{'per sample':<14}" + "".join(f"{k:>10}" for k in ("p50", "p90", "p99", "max"))]
    for name, values in stats["percentiles"].items():
        lines.append(f"{name:<14}" + "".join(f"{v:>10,}" for v in values.values()))
    rejects = stats["rejects"]
    lines += ["", f"rejects: {sum(rejects.values()):,}" + (" (see rejects.jsonl)" if rejects else "")]
    lines += [f"  {reason:<24}{n:>8,}" for reason, n in rejects.items()]
    return "\n".join(lines)
