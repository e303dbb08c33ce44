"""LightningDataModule: recipe -> shards -> processed samples -> padded batches."""
from __future__ import annotations

from functools import partial

import lightning as L
from torch.utils.data import DataLoader

from ov_train.data.recipe import load_recipe
from ov_train.data.samples import SampleProcessor, collate
from ov_train.data.stream import MixedStream, ValStream


class OneVisionData(L.LightningDataModule):
    def __init__(self, data_cfg, stage_cfg, tokenizer, geometry, seed: int = 0):
        super().__init__()
        self.cfg = data_cfg
        self.sources = load_recipe(data_cfg.recipe, data_cfg.root)
        self.process = SampleProcessor(
            tokenizer=tokenizer,
            geometry=geometry,
            template=stage_cfg.template,
            image_strategy=stage_cfg.image_strategy,
            max_frames=stage_cfg.max_frames,
            max_length=stage_cfg.max_length,
        )
        self.collate = partial(collate, pad_id=tokenizer.pad_token_id)
        self.seed = seed

    def _loader(self, dataset):
        workers = int(self.cfg.num_workers)
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.batch_size),
            num_workers=workers,
            collate_fn=self.collate,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self):
        return self._loader(MixedStream(self.sources, self.process, self.seed, int(self.cfg.shuffle_buffer)))

    def val_dataloader(self):
        return self._loader(ValStream(self.sources, self.process, self.cfg.val_samples))
