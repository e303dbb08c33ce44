"""StreamState: where the training data streams are, saved in checkpoints for exact resume; the realized mix.

Every training batch carries `stream_state` (its logical reader and that reader's state right after
it). This callback keeps the latest state per reader from the batches training actually consumed
(prefetched ones are not), and the number consumed; both go into the checkpoint. On resume, and at
each epoch start (a new loader iterator restarts the streams), it hands them to the datamodule, so
each reader continues where it stopped.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class StreamState(Callback):
    def __init__(self, keys_file: Path | None = None):
        self.keys_file = keys_file  # optional: one JSON line of consumed sample keys per batch
        self.states: dict[int, dict] = {}
        self.readers = 0
        self.consumed = 0
        # Samples consumed since the run first started (this rank's): in all, per mix label, skipped.
        self.samples = 0
        self.counts: Counter = Counter()
        self.skipped: Counter = Counter()
        self._labels: dict[str, list[str]] = {}
        self._datamodule = None

    def setup(self, trainer, pl_module, stage):
        self._datamodule = trainer.datamodule
        for source in getattr(self._datamodule, "recipe", None) or ():
            groups = (("modality", source.modality), ("category", source.category))
            self._labels[source.name] = [f"mix_{source.name}"] + [f"mix_{kind}_{value}" for kind, value in groups if value]

    def on_train_epoch_start(self, trainer, pl_module):
        # Overfitting (trainer.overfit_batches) wants the same batches every epoch: the streams start over.
        if not trainer.overfit_batches:
            self._hand_over()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        where = batch.get("stream_state")
        if where is None:
            return
        self.states[where["reader"]] = where["state"]
        self.readers = where["readers"]
        self.consumed += 1
        self.samples += len(batch["source"])
        for name in batch["source"]:
            self.counts.update(self._labels.get(name, [f"mix_{name}"]))
        self.skipped.update(batch["skipped"])
        labels = set(self.counts).union(*self._labels.values())
        metrics = {f"data/{label}": self.counts[label] / self.samples for label in sorted(labels)}
        metrics.update({f"data/skipped_{reason}": float(n) for reason, n in self.skipped.items()})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch["source"]))
        if self.keys_file is not None:
            record = {"rank": trainer.global_rank, "step": trainer.global_step, "batch": self.consumed, "keys": batch["key"]}
            with open(self.keys_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def state_dict(self) -> dict:
        states = dict(self.states)
        # Each rank only sees its own readers; the checkpoint (written by rank 0) needs them all.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            states = {reader: state for part in gathered for reader, state in part.items()}
        return {
            "states": states,
            "readers": self.readers,
            "consumed": self.consumed,
            "samples": self.samples,
            "counts": dict(self.counts),
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.states = {int(k): v for k, v in state_dict["states"].items()}
        self.readers, self.consumed, self.samples = state_dict["readers"], state_dict["consumed"], state_dict["samples"]
        self.counts, self.skipped = Counter(state_dict["counts"]), Counter(state_dict["skipped"])
        # Lightning restores callbacks after setup() and before it asks for the train loader.
        self._hand_over()

    def _hand_over(self) -> None:
        if not self.states:
            return
        resume = getattr(self._datamodule, "resume_stream", None)
        if resume is None:
            log.warning("no datamodule with resume_stream(): training data restarts from the beginning")
            return
        resume(self.states, self.consumed, self.readers)
