"""Where a run's checkpoints are and which one a resume reads: checkpoints/last.ckpt, rewritten in place; the
`checkpoint.keep` most recent earlier ones as step=N.ckpt; a sharded save's previous version while the new one is
renamed into place. On the plan's floor: `ckpt_path=last` / `auto` are resolved with the rest of the config."""
from __future__ import annotations

from pathlib import Path

from ov_train.utils.logging import get_logger

log = get_logger(__name__)

KEPT = "step={step}"  # ModelCheckpoint's file name pattern for the kept ones (.ckpt added)


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def previous_of(path: Path) -> Path:
    """Where a sharded checkpoint's previous version waits while the new one is renamed into place."""
    return path.with_name(f".{path.name}.previous")


def resume_candidates(run_dir: Path) -> list[Path]:
    """What `ckpt_path=auto` / `last` may resume in `run_dir`, newest first, those that exist: checkpoints/last.ckpt;
    its .previous (a sharded save killed between its renames leaves it as the last whole one); the step=N.ckpt
    that checkpoint.keep kept, highest N first. The newest that reads is resumed (run.check)."""
    last = last_checkpoint(run_dir)
    prefix = KEPT.partition("{")[0]
    kept = [(int(step), p) for p in last.parent.glob(f"{prefix}*.ckpt")
            if (step := p.name.removeprefix(prefix).removesuffix(".ckpt")).isdigit()]
    newest_kept = [p for _, p in sorted(kept, reverse=True)]
    return [p for p in (last, previous_of(last), *newest_kept) if p.exists()]


def resume_targets(ckpt_path: str | None, run_dir: Path | None) -> tuple[str, ...]:
    """The checkpoints to resume, newest first (run.check resumes the first that reads; none: a fresh start).
    A path: itself. `last`: this run directory's resume_candidates, of which there must be one; `auto`: those, or
    none (what a requeued SLURM job wants). Both mean resuming in the first run's hydra.run.dir. ValueError says
    why `ckpt_path` resumes nothing."""
    if ckpt_path not in ("last", "auto"):
        return (ckpt_path,) if ckpt_path else ()
    if run_dir is None:
        raise ValueError(f"ckpt_path={ckpt_path} needs a run directory")
    candidates = tuple(map(str, resume_candidates(run_dir)))
    if candidates:
        return candidates
    last = last_checkpoint(run_dir)
    if ckpt_path == "auto":
        # Said, since a run directory other than the first run's (the default one is timestamped) finds nothing.
        log.info("ckpt_path=auto: no checkpoint at %s, starting fresh (a resume runs in the first run's hydra.run.dir)",
                 last)
        return ()
    raise ValueError(f"ckpt_path=last: no checkpoint at {last}; resume in the first run's hydra.run.dir")
