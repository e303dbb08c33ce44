"""Read checkpoint files that users hand us without running code from them.

A checkpoint is a pickle, and unpickling can call anything the file names. Every file is read with
torch.load(weights_only=True), which builds only tensors, containers, primitives and the few classes
allowed here; torch.distributed.checkpoint's `.metadata` (a plain pickle in a newer protocol than the
weights-only unpickler reads) goes through an unpickler that resolves only its own metadata classes.
A file that needs more is refused with the global it asked for, unless the caller trusts it.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from ov_train.utils.logging import get_logger, settle_deepspeed_accelerator

log = get_logger(__name__)

TRUST_HINT = (
    "if you trust whoever wrote it, load it anyway with `ov-export --trust-checkpoint` or `checkpoint.trust=true`"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: not a checkpoint, truncated, or asking to run code."""


def _deepspeed_globals() -> list:
    """Classes DeepSpeed pickles into its ZeRO optimizer states (plain data holders; their modules are trusted code)."""
    settle_deepspeed_accelerator()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _refusal(name: str | Path, err: pickle.UnpicklingError) -> CheckpointError:
    message = str(err)
    found = (re.search(r"GLOBAL (\S+) was not an allowed global", message)
             or re.search(r"unsupported GLOBAL (\S+) whose module", message)  # os, subprocess...: blocked outright
             or re.search(r"global (\S+) is not allowed", message))
    if found is None:  # an opcode or a call weights_only does not allow: damage, or a handmade pickle
        reason = re.search(r"WeightsUnpickler error: (.*)", message)
        return CheckpointError(
            f"{name}: not a readable checkpoint (damaged, or more than tensors and plain data:"
            f" {reason.group(1) if reason else message.splitlines()[0]}); {TRUST_HINT}"
        )
    return CheckpointError(
        f"{name}: refused to load: it asks for {found.group(1)}, outside the tensors and plain data an ov_train"
        f" checkpoint holds (unpickling it could run code); {TRUST_HINT}"
    )


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [""])[0]


def load_file(path: str | Path, *, trust: bool = False, map_location: Any = "cpu", mmap: bool = True,
              deepspeed: bool = False) -> Any:
    """torch.load of one file, weights_only unless `trust`; `mmap` leaves tensors on disk until touched (metadata
    reads stay cheap). `deepspeed` also allows the classes DeepSpeed puts in its optimizer-state files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return load_source(path, str(path), trust=trust, map_location=map_location, mmap=mmap, deepspeed=deepspeed)


def load_source(source: Path | IO[bytes], name: str, *, trust: bool = False, map_location: Any = "cpu",
                mmap: bool = False, deepspeed: bool = False) -> Any:
    """load_file for a path or an in-memory torch.save record; `name` says where it came from in messages."""
    if not zipfile.is_zipfile(source):
        # torch.save has written zip archives since torch 1.6; anything else is not one of ours, or was cut short.
        raise CheckpointError(f"{name}: not a torch checkpoint (no zip archive: a different kind of file, or truncated)")
    if not isinstance(source, Path):
        source.seek(0)
    if trust:
        log.warning("loading %s with full unpickling (trusted): it may run code", name)
    allowed = _deepspeed_globals() if deepspeed and not trust else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location=map_location, weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not trust and "Weights only load failed" in str(err):
            raise _refusal(name, err) from None
        raise CheckpointError(f"{name}: not a readable checkpoint ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - damaged archives fail in many ways (zip reader, decoding, unpickling)
        raise CheckpointError(f"{name}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from None


# torch.distributed.checkpoint's metadata: its own dataclasses, torch sizes, dtypes and layouts, a path.
_DCP_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals a DCP `.metadata` file holds (the stdlib's way to restrict unpickling)."""

    def find_class(self, module, name):
        if name in _DCP_ALLOWED.get(module, ()) or (
            module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint's metadata")


def load_dcp_metadata(path: str | Path, *, trust: bool = False):
    """The `.metadata` of a torch.distributed.checkpoint directory, unpickled safely unless `trust`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return (pickle.Unpickler if trust else _DCPMetadataUnpickler)(f).load()
    except pickle.UnpicklingError as err:
        if "is not allowed" in str(err):
            raise _refusal(path, err) from None
        raise CheckpointError(f"{path}: not a readable checkpoint metadata file ({err})") from None
    except Exception as err:  # noqa: BLE001 - as in load_source
        raise CheckpointError(f"{path}: not a readable checkpoint metadata file ({type(err).__name__}: {_first_line(err)})") from None
