"""The data loader alone: training's own train loader over shards of the benchmark's mixture, no model; the same
shards read from the local disk and over HTTP from a server on the loopback interface."""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ov_train.bench.mixture import synthetic_mixture, write_mixture_shards
from ov_train.config.compose import compose
from ov_train.config.run_plan import resolve_plan
from ov_train.data.prepare import prepare_data
from ov_train.training.datamodule import OneVisionData
from ov_train.training.metrics import batch_counts


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_http(root: Path):
    """`root` served over HTTP on 127.0.0.1 from a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _measure(args, tokenizer, geometry, root: str) -> tuple[dict, OneVisionData, int]:
    workers = args.loader_workers
    # The shipped configs' plan for the onevision stage on these shards, as training would resolve it.
    overrides = ["stage=onevision", "data=recipe", f"data.root={root}", f"data.num_workers={workers}",
                 "data.index_dir=null", f"seed={args.seed}"]
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
    result = {"samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed, "workers": workers,
              "cpus": len(os.sched_getaffinity(0))}
    return result, data, warmup


def loader_bench(args, tokenizer, geometry) -> list[dict]:
    """Training's own train loader over shards of the synthetic mixture: samples and tokens delivered per second,
    reading them locally (`loader`) and over loopback HTTP (`loader_http`)."""
    with tempfile.TemporaryDirectory(prefix="ov_bench_shards_") as root:
        raws = synthetic_mixture(args.loader_samples, geometry.image_size, args.seed)
        shards = write_mixture_shards(raws, Path(root), max(1, args.loader_workers))
        del raws  # the shards hold them now; the forked workers need no copy
        local, data, warmup = _measure(args, tokenizer, geometry, root)
        with serve_http(Path(root)) as url:
            http, _, _ = _measure(args, tokenizer, geometry, url)
    print(f"loader: onevision recipe, {args.loader_samples} samples in {shards} shards, batches of up to "
          f"{data.budget.max_tokens} padded tokens, {args.loader_batches} batches timed after {warmup} warmup; "
          "read locally, then over HTTP from 127.0.0.1")
    results = []
    for name, label, result in (("loader", "loader", local), ("loader_http", "loader/http", http)):
        print(f"{label:<9} samples/s {result['samples_per_s']:.1f}  tokens/s {result['tokens_per_s']:.1f}  "
              f"workers {result['workers']}  cpus {result['cpus']}")
        results.append({"name": name, **result})
    return results
