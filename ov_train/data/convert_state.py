"""What an `ov-data convert` output folder remembers between runs, so a rerun resumes only what is still true.

    parts/settings.json   the settings of the conversion: a rerun with other settings is refused
    parts/inputs.json     size, mtime and head hash of every input file: a rerun on changed inputs starts over
    parts/part-K.json     chunk K's index part, written after its shards: chunk K is finished

Every file appears under its final name only when complete (temp + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

from ov_train.data.formats import InputError
from ov_train.utils.logging import get_logger
from ov_train.utils.paths import write_atomic

log = get_logger(__name__)

PARTS_DIR = "parts"
SHARD_PREFIX = "train"  # the name data recipes look for (`train-*.tar`)
VAL_PREFIX = "val"  # held-out shards (`ov-data convert --holdout`), which recipes find as `val-*.tar`
_SHARDS = [f"{prefix}-[0-9]*-[0-9]*.tar" for prefix in (SHARD_PREFIX, VAL_PREFIX)]


def part_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"part-{index:06d}.json"


def finished(out: Path, index: int) -> bool:
    try:
        part = json.loads(part_path(out, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all((out / shard).is_file() for shard in part["shards"])


def claim(out: Path, settings: dict, inputs: list[dict]) -> str | None:
    """Make `out` this conversion's folder. Other settings are refused; changed inputs drop every finished
    chunk (the conversion restarts). Returns why it restarted, or None."""
    parts = out / PARTS_DIR
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create ({err.strerror or err})") from err
    previous = _read_json(parts / "settings.json")
    if previous is not None and previous != settings:
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        raise InputError(f"--out {out} holds a conversion with other settings ({', '.join(changed)}); "
                         "use a fresh --out or the same settings")
    restarted = None
    recorded = _read_json(parts / "inputs.json")
    if recorded != inputs:
        restarted = _input_change(recorded, inputs)
        # Finished parts go first: a crash half-way through leaves inputs.json stale, so the next run restarts too.
        leftovers = sorted(parts.glob("part-*.json")) + [p for pattern in _SHARDS for p in sorted(out.glob(pattern))]
        if leftovers:
            log.warning("ov-data convert: %s; converting %s from scratch", restarted, out)
        else:
            restarted = None  # nothing was done yet: a fresh start, not a restart
        for path in leftovers + [out / "index.json", out / "rejects.jsonl"]:
            path.unlink(missing_ok=True)
        write_atomic(parts / "inputs.json", json.dumps(inputs, indent=2))
    if previous is None:
        write_atomic(parts / "settings.json", json.dumps(settings, indent=2))
    # Temp files of a killed run are never finished files: drop them.
    for folder in (out, parts):
        for tmp in folder.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    return restarted


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err}); use a fresh --out") from err


def _input_change(recorded, inputs: list[dict]) -> str:
    if not isinstance(recorded, list):
        return "the earlier run recorded no fingerprint of its input"
    old = {f.get("path"): f for f in recorded if isinstance(f, dict)}
    for now in inputs:
        before = old.get(now["path"])
        if before is None:
            return f"{now['path']} was not an input of the earlier run"
        what = [k for k in ("size", "mtime_ns", "head_sha256") if before.get(k) != now[k]]
        if what:
            return f"{now['path']} changed since the earlier run ({', '.join(what)})"
    return "the input files differ from the earlier run's"
