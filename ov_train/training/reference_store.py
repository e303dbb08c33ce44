"""Precomputed reference log-probabilities (stage.preference.reference=precomputed): no second model in memory.

Before the first step, the starting weights run once over the pairs this rank will train on (its train loader's
first trainer.max_steps batches, the order the run then reads them in) and over its held-out pairs, under no_grad;
each pair's chosen and rejected log-probability is stored by its source and key in RUN/reference/rank<r>.pt. The
file is written every SAVE_EVERY batches (atomically), so a pass that is killed continues where its last write
stopped; a resume, or a rerun of the same run, finds it complete and reads it. The file records what decides its
numbers (the run's identity and its starting weights); one recorded for anything else is computed anew.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ov_train.model.preference import PairLogps, pair_logps
from ov_train.utils.logging import get_logger

log = get_logger(__name__)
SAVE_EVERY = 50  # batches between writes of an unfinished pass (the same on every rank: sharded engines agree)


def _pair_keys(batch: dict) -> list[str]:
    return [f"{s}/{k}" for s, k in zip(batch["source"], batch["key"])]


class ReferenceStore:
    def __init__(self, directory: Path, identity: dict):
        self.directory, self.identity = Path(directory), identity
        self.values: dict[str, tuple[float, float]] = {}
        self.done = {"train": 0, "val": False}

    def _file(self, rank: int) -> Path:
        return self.directory / f"rank{rank}.pt"

    def _load(self, rank: int) -> None:
        path = self._file(rank)
        if not path.is_file():
            return
        stored = torch.load(path, weights_only=True)
        if stored.get("identity") != self.identity:
            log.warning("%s was computed for another run (%s); computing the reference anew", path, stored.get("identity"))
            return
        self.values, self.done = stored["values"], stored["done"]

    def _save(self, rank: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._file(rank)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save({"identity": self.identity, "values": self.values, "done": self.done}, tmp)
        os.replace(tmp, path)

    def lookup(self, batch: dict, device) -> PairLogps:
        """The stored reference log-probabilities of a pair batch's pairs."""
        keys = _pair_keys(batch)
        missing = [k for k in keys if k not in self.values]
        if missing:
            raise RuntimeError(f"no precomputed reference log-probability for {missing[:3]} in {self.directory}: the "
                               "pass before training saw other pairs (data changed since?); remove it to recompute")
        rows = torch.tensor([self.values[k] for k in keys], dtype=torch.float32, device=device)
        return PairLogps(rows[:, 0], rows[:, 1])

    def fill(self, model, options, train_batches, val_batches, steps: int, rank: int, device) -> None:
        """Compute what is missing: the first `steps` train items (a batch, or a step's micro-batches) and every
        held-out batch, with `model` as it is now (the starting weights)."""
        self._load(rank)
        if self.done["train"] >= steps and self.done["val"]:
            log.info("reference log-probabilities: %d pairs read from %s", len(self.values), self.directory)
            return
        log.info("reference log-probabilities: one pass of the starting weights over %d training steps' pairs and the"
                 " held-out pairs (from step %d) -> %s", steps, self.done["train"], self.directory)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for index, item in zip(range(steps), train_batches):
                if index < self.done["train"]:
                    continue  # stored by a pass that was stopped
                for batch in item.get("micro_batches", [item]):
                    self._add(model, options, batch, device)
                self.done["train"] = index + 1
                if self.done["train"] % SAVE_EVERY == 0:
                    self._save(rank)
            if not self.done["val"]:
                for batch in val_batches:
                    self._add(model, options, batch, device)
                self.done["val"] = True
        model.train(was_training)
        self._save(rank)

    def _add(self, model, options, batch, device) -> None:
        logps, _, _ = pair_logps(model, _to(batch, device), options)
        for key, c, r in zip(_pair_keys(batch), logps.chosen.float().tolist(), logps.rejected.float().tolist()):
            self.values[key] = (c, r)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def reference_store(plan, model, data) -> ReferenceStore | None:
    """The run's store under stage.preference.reference=precomputed, else None. Its identity: the run's (stage,
    model, seed, steps, adapters) and where the starting weights came from."""
    if not plan.preference or plan.preference.reference != "precomputed":
        return None
    identity = {**plan.identity, "init": plan.model.source, "recipe": plan.data.recipe.name}
    return ReferenceStore(plan.paths.reference, identity)
