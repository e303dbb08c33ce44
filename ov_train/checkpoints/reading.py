"""Read any checkpoint ov_train writes (a Lightning file, a DeepSpeed ZeRO or an FSDP2 directory, consolidated on CPU
in one process), unpickling tensors and plain data only unless trusted (safe_load.py); and a resume's identity check.
Adapter checkpoints hold the trainable tensors only: adapters.py puts them back on their base.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

from ov_train.checkpoints.safe_load import (
    TRUST_HINT,
    CheckpointError,
    load_dcp_metadata,
    load_file,
    load_source,
)
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


def checkpoint_format(path: str | Path) -> str:
    """`file` (a Lightning checkpoint), `deepspeed` (a ZeRO checkpoint directory) or `fsdp2` (a distributed one)."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / "latest").is_file():
        return "deepspeed"
    if (path / ".metadata").is_file():
        return "fsdp2"
    raise CheckpointError(
        f"{path}: not a checkpoint (neither a file, nor a DeepSpeed directory with 'latest',"
        " nor a torch.distributed.checkpoint directory with '.metadata')"
    )


def _inside(root: Path, name: str) -> Path:
    """root/name, refusing names (read from the checkpoint itself) that lead out of root."""
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CheckpointError(f"{root}: names {name!r}, outside the checkpoint directory")
    return target


def _deepspeed_files(path: Path) -> list[Path]:
    """The tag directory's files, rank 0's model states (the Lightning checkpoint minus weights and optimizer) first."""
    tag_dir = _inside(path, (path / "latest").read_text().strip())
    files = sorted(tag_dir.glob("*.pt"), key=lambda f: (not f.name.endswith("model_states.pt"), f.name))
    if not files or not files[0].name.endswith("model_states.pt"):
        raise CheckpointError(f"{tag_dir}: a DeepSpeed checkpoint directory without *model_states.pt")
    return files


def _check_dcp(path: Path, trust: bool) -> None:
    """A torch.distributed.checkpoint directory's pickles: `.metadata`, and its non-tensor entries (torch.save
    records inside the .distcp files), which torch's default load planner unpickles with weights_only=False."""
    metadata = load_dcp_metadata(path / ".metadata", trust=trust)
    if trust:
        return
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        MetadataIndex,
    )

    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue  # tensors are read as raw storage, with weights_only=True
        info = metadata.storage_data[MetadataIndex(fqn)]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: entry {fqn} is stored transformed, so it cannot be checked; {TRUST_HINT}")
        with open(_inside(path, info.relative_path), "rb") as f:
            f.seek(info.offset)
            load_source(io.BytesIO(f.read(info.length)), f"{path / info.relative_path} (entry {fqn})")


def checkpoint_metadata(path: str | Path, trust: bool = False) -> dict:
    """The Lightning checkpoint's entries other than weights and optimizer state (global_step, ov_train, ...).

    Every pickle of the checkpoint is read here with weights_only (unless `trust`), so what Lightning, DeepSpeed
    and torch.distributed.checkpoint unpickle afterwards, some of it with weights_only=False, was checked first.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    if kind == "deepspeed":
        model_states, *others = _deepspeed_files(path)
        for f in others:
            load_file(f, trust=trust, deepspeed=True)
        meta = load_file(model_states, trust=trust, deepspeed=True)
    elif kind == "fsdp2":
        _check_dcp(path, trust)
        meta = load_file(path / "meta.pt", trust=trust)  # Lightning's name (lightning.fabric.utilities.load)
    else:
        meta = load_file(path, trust=trust)
    if not isinstance(meta, dict) or (kind == "file" and "state_dict" not in meta):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return meta


def load_weights(path: Path, kind: str, model, trust: bool = False, trainable_only: bool = False) -> None:
    """Fill `model` with the checkpoint's fp32 weights: every tensor must be there, and nothing else; with
    `trainable_only` (an adapter checkpoint), exactly the tensors that train (requires_grad), the rest staying as
    the model was built (its base). The checkpoint's pickles were checked by checkpoint_metadata."""
    wanted = {k for k, p in model.named_parameters() if p.requires_grad} if trainable_only else set(model.state_dict())
    if kind == "fsdp2":
        import torch.distributed.checkpoint as dcp

        # Read in place into full tensors, without a process group: no_dist reassembles every shard here.
        current = model.state_dict(keep_vars=True)
        target = {"state_dict": {f"model.{k}": current[k].data for k in wanted}}
        stored = {k for k in load_dcp_metadata(path / ".metadata", trust=trust).state_dict_metadata if k.startswith("state_dict.")}
        expected = {f"state_dict.{k}" for k in target["state_dict"]}
        if stored != expected:
            missing, unexpected = sorted(expected - stored)[:5], sorted(stored - expected)[:5]
            raise CheckpointError(f"{path}: weights do not fit the model: missing {missing}, unexpected {unexpected}")
        with warnings.catch_warnings():
            # torch warns that it "assumes" a single-process load even when no_dist asks for one.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(target, checkpoint_id=path, no_dist=True)
        return
    if kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        # The fp32 master weights, gathered from every rank's optimizer partition (ZeRO-2 and ZeRO-3 alike).
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), exclude_frozen_parameters=trainable_only)
    else:
        state = load_file(path, trust=trust)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if trainable_only and set(state) != wanted:
        missing, unexpected = sorted(wanted - set(state))[:5], sorted(set(state) - wanted)[:5]
        raise CheckpointError(f"{path}: its trainable tensors do not fit its adapters: missing {missing}, unexpected"
                              f" {unexpected}")
    try:
        model.load_state_dict(state, strict=not trainable_only)
    except RuntimeError as err:  # missing, unexpected or differently sized tensors, all listed
        raise CheckpointError(f"{path}: weights do not fit the model recorded in it: {err}") from None


def ov_train_metadata(path: str | Path, trust: bool = False) -> dict:
    """The checkpoint's `ov_train` entry (model config, tokenizer, run identity, adapters, ...)."""
    meta = checkpoint_metadata(path, trust).get("ov_train")
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{path}: not an ov_train checkpoint (no 'ov_train' metadata with the model config)")
    return meta


def model_from_checkpoint(ckpt_path: str | Path, trust: bool = False):
    """Rebuild the trained model from any full checkpoint ov_train writes (file, DeepSpeed or FSDP2 directory).

    Returns (model, tokenizer_dir). Sharded checkpoints are consolidated here, on CPU, in one process. Nothing in
    the checkpoint is unpickled beyond tensors and plain data unless `trust`; CheckpointError says what is wrong.
    Adapter checkpoints hold no base: checkpoints/adapters.py puts them back on theirs.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    path = Path(ckpt_path)
    kind = checkpoint_format(path)
    meta = ov_train_metadata(path, trust)
    if meta.get("adapter"):
        raise CheckpointError(f"{ckpt_path}: an adapter checkpoint (adapter={meta['adapter']['kind']}), without its base"
                              " weights; ov-export merges it into its base (ov_train.checkpoints.adapters)")
    try:
        config = LlavaOnevisionConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt_path}: its model config does not load: {err}") from None
    model = LlavaOnevisionForConditionalGeneration(config)
    load_weights(path, kind, model, trust)
    return model, meta.get("tokenizer_dir")


def _flat(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}") if isinstance(value, dict) else {f"{prefix}.{key}": value})
    return out


def resume_problems(candidates: Sequence[str], identity: dict, trust: bool = False) -> tuple[str, list[str]]:
    """The checkpoint to resume, the first of `candidates` (newest first) that reads, and why a run of `identity`
    cannot resume it (the plan's: stage, model and its geometry, the adapters and their base, the seed, max_steps:
    the learning-rate schedule spans max_steps, so another value would make it jump, or with fewer steps than done
    end the run at once). One that does not read (truncated, damaged, refused) is skipped, saying why. Reads only
    the checkpoints' pickles (tensors stay on disk)."""
    unread = []
    for ckpt_path in candidates:
        try:
            meta = checkpoint_metadata(ckpt_path, trust=trust)
            break
        except CheckpointError as err:
            unread.append(str(err))
    else:
        return candidates[0], [f"ckpt_path={candidates[0]}: {'; '.join(unread)}"]
    if unread:
        log.warning("skipped %s; resuming from %s, the newest checkpoint that reads", "; ".join(unread), ckpt_path)
    stored = (meta.get("ov_train") or {}).get("run")
    if stored is None:
        log.warning("ckpt_path=%s records no run identity (an older checkpoint): resuming unchecked", ckpt_path)
        return ckpt_path, []
    problems = [
        f"{key}: the checkpoint's {stored.get(key)!r}, this run's {identity[key]!r}"
        for key in ("stage", "model") if stored.get(key) != identity[key]
    ]
    if not problems:
        before, after = _flat(stored.get("geometry") or {}, "model"), _flat(identity["geometry"], "model")
        problems += [
            f"{key}: the checkpoint's {before.get(key)!r}, this run's {after.get(key)!r}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)
        ]
    for key, what in (("adapter", "adapter"), ("base", "the adapters' base (model.* and seed)")):
        if stored.get(key) != identity.get(key):
            problems.append(f"{what}: the checkpoint's {stored.get(key)!r}, this run's {identity.get(key)!r}")
    if "seed" in stored and stored["seed"] != identity["seed"]:  # checkpoints before it was recorded: unchecked
        problems.append(
            f"seed: the checkpoint's run has seed={stored['seed']}, this one seed={identity['seed']}; the data order"
            f" and dropout follow it, so an exact resume needs seed={stored['seed']}"
        )
    if stored.get("max_steps") != identity["max_steps"]:
        problems.append(
            f"trainer.max_steps: the checkpoint's run has {stored.get('max_steps')}, this one {identity['max_steps']}"
            f" (at step {meta.get('global_step')}); the learning-rate schedule spans max_steps, so resume with"
            f" trainer.max_steps={stored.get('max_steps')}, or train on from it in a new run with model.init_from=CKPT"
        )
    if problems:
        return ckpt_path, [f"ckpt_path={ckpt_path} is not a checkpoint of this run:\n    " + "\n    ".join(problems)]
    log.info("resuming from %s at step %s", ckpt_path, meta.get("global_step"))
    return ckpt_path, []
