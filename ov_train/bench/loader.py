"""The data loader alone: training's own train loader over shards of the benchmark's mixture, no model."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ov_train.bench.mixture import synthetic_mixture, write_mixture_shards
from ov_train.config.compose import compose
from ov_train.config.run_plan import resolve_plan
from ov_train.data.prepare import prepare_data
from ov_train.training.datamodule import OneVisionData
from ov_train.training.metrics import batch_counts


def loader_bench(args, tokenizer, geometry) -> dict:
    """Training's own train loader over shards of the synthetic mixture: samples and tokens delivered per second."""
    workers = args.loader_workers
    with tempfile.TemporaryDirectory(prefix="ov_bench_shards_") as root:
        raws = synthetic_mixture(args.loader_samples, geometry.image_size, args.seed)
        shards = write_mixture_shards(raws, Path(root), max(1, workers))
        del raws  # the shards hold them now; the forked workers need no copy
        # The shipped configs' plan for the onevision stage on these shards, as training would resolve it.
        overrides = ["stage=onevision", "data=recipe", f"data.root={root}", f"data.num_workers={workers}",
                     f"seed={args.seed}"]
        plan = resolve_plan(compose(overrides)).data
        data = OneVisionData(plan, prepare_data(plan), tokenizer, geometry)
        loader = data.train_dataloader()
        # Each worker's first batch carries its start-up (fork, shard headers), so the clock starts after them all.
        warmup = max(1, workers)
        samples = tokens = 0
        for i, batch in enumerate(loader):
            if i >= warmup:
                samples += len(batch["key"])
                tokens += int(batch_counts(batch)[1])
            if i == warmup - 1:
                start = time.perf_counter()
            if i == warmup + args.loader_batches - 1:
                break
        elapsed = time.perf_counter() - start
    result = {"name": "loader", "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
              "workers": workers, "cpus": len(os.sched_getaffinity(0))}
    print(f"loader: onevision recipe, {args.loader_samples} samples in {shards} shards, batches of up to "
          f"{data.budget.max_tokens} padded tokens, {args.loader_batches} batches timed after {warmup} warmup")
    print(f"{'loader':<9} samples/s {result['samples_per_s']:.1f}  tokens/s {result['tokens_per_s']:.1f}  "
          f"workers {workers}  cpus {result['cpus']}")
    return result
