"""LightningDataModule: recipe -> shards -> processed samples -> token-budget batches."""
from __future__ import annotations

import os
from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from ov_train.config.run_plan import DataPlan
from ov_train.data.batching import HeldOutBatches, TrainBatches
from ov_train.data.compute_batches import SampleCost
from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.data.parquet_source import with_indexes
from ov_train.data.recipe import Recipe
from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.stream import MixedStream, ValStream
from ov_train.data.synthetic import synthetic_rejected
from ov_train.training.held_out import EvenHeldOut
from ov_train.training.loader_workers import init_worker, main_exiting
from ov_train.utils.logging import get_logger

log = get_logger(__name__)


class OneVisionData(L.LightningDataModule):
    """The plan's data (`recipe`: its sources located, ov_train.data.prepare) as train and held-out loaders."""

    def __init__(self, plan: DataPlan, recipe: Recipe, tokenizer, geometry, cost: SampleCost | None = None):
        """`cost`: a sample's training cost, which data.batching=compute fills batches by (it needs one)."""
        super().__init__()
        self.plan = plan
        if plan.config.batching == "compute" and cost is None:
            raise ValueError("data.batching=compute needs the model's sample cost (SampleCost.of_model)")
        self.cost = cost if plan.config.batching == "compute" else None
        # Parquet sources get their index (convert's checks, once) before any stream reads them.
        self.recipe = with_indexes(recipe, plan.config.index_dir, tokenizer, plan.config.io)
        self.budget = plan.budget
        samples = plan.samples
        self.process = SampleProcessor(
            tokenizer=tokenizer,
            geometry=geometry,
            template=samples.template,
            media=samples.media,
            max_length=samples.max_length,
            placement=samples.placement,
            decode=samples.decode,
            labels=samples.labels,
            plain_newline=samples.plain_newline,
        )
        self.collate = partial(collate, pad_id=tokenizer.pad_token_id)
        if plan.pairs:  # stage.preference: each sample a pair, its media once in the batch
            self.process = PairProcessor(self.process, synthetic_rejected if plan.synthetic else None)
            self.collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
        self._resume: tuple[dict, int] = ({}, 0)
        self._train: TrainBatches | None = None
        mix = ", ".join(f"{name} {100 * share:.1f}%" for name, share in self.recipe.shares("name").items())
        unit = "tokens' worth of compute (real tokens)" if self.cost else "padded tokens"
        log.info("recipe %s: %s; batch limits: %s %s, %s samples", self.recipe.name, mix,
                 self.budget.max_tokens or "no", unit, self.budget.max_samples or "no")

    def resume_stream(self, states: dict[int, dict], consumed: int, readers: int) -> None:
        """Continue each logical reader from its saved state when the train loader next starts its workers
        (StreamState hands the states over on resume and at every epoch start)."""
        now = self.trainer.world_size // self.plan.replicas * max(1, self.plan.num_workers)
        if readers != now:
            log.warning(
                "the checkpoint's data streams ran on %d readers (ranks x loader workers), this run has %d:"
                " streams restart from their beginning, so resumed data order is not exact", readers, now,
            )
            return
        self._resume = (states, consumed)
        if self._train is not None:
            self._train.resume(states, consumed)

    def _loader(self, dataset, persistent: bool):
        workers = self.plan.num_workers
        # seed_everything(workers=True) sets PL_SEED_WORKERS, for which Lightning adds its worker_init_fn.
        seed = bool(int(os.environ.get("PL_SEED_WORKERS", 0)))
        init = partial(init_worker, rank=self.trainer.global_rank if self.trainer is not None else 0, seed=seed,
                       exiting=main_exiting())
        return DataLoader(
            dataset, batch_size=None, num_workers=workers, persistent_workers=persistent and workers > 0,
            worker_init_fn=init if workers else None,
        )

    def train_dataloader(self):
        plan = self.plan
        make_stream = partial(MixedStream, self.recipe.sources, self.process, plan.seed, plan.config.shuffle_buffer,
                              max_skips_in_a_row=plan.config.max_skips_in_a_row, io=plan.config.io)
        # With data.samples_per_step each train item is one optimizer step's micro-batches.
        # A sequence-parallel group (plan.replicas consecutive ranks) reads one stream: its ranks split each row.
        self._train = TrainBatches(make_stream, self.budget, self.collate, plan.samples_per_rank, self.cost,
                                   plan.replicas)
        self._train.resume(*self._resume)
        # Workers restart with each epoch's iterator, so they take up the consumed position handed over then.
        return self._loader(self._train, persistent=False)

    def val_dataloader(self):
        held_out = ValStream(self.recipe.sources, self.process, self.plan.config.val_samples, self.plan.config.max_skips_in_a_row,
                             self.plan.config.io, self.plan.replicas)
        # Every rank validates as many batches as the rank with the most (sharded engines need them all in each forward).
        return EvenHeldOut(self._loader(HeldOutBatches(held_out, self.budget, self.collate), persistent=True))
