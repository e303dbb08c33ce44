"""Training throughput: the stock transformers recipe against ov_train's path, in one process.

    python -m ov_train.bench                 # OV-0.5B geometry (random init) on the GPU
    python -m ov_train.bench --tiny          # tiny geometry on CPU, seconds (CI)
    python -m ov_train.bench --adapter lora  # and a LoRA row: trainable parameters, optimizer state, peak memory
    python -m ov_train.bench --loader        # the data loader alone: what it delivers per second
    python -m ov_train.bench --loader DIR    # CPU per sample and cores per GPU on DIR's shards, against the reference
    python -m ov_train.bench --both          # model bench and loader; ratio loader / ov_train tokens/s
    python -m ov_train.bench --goals DIR     # the goals against the --json results in DIR
    python -m ov_train.bench --pairs         # DPO steps: each pair's media encoded once against twice (bench/pairs.py)
    python -m ov_train.bench --balance       # 8 ranks simulated: token budget against compute budget (bench/balance.py)

Both paths (stock: batch 1 with accumulation, full logits; ov_train: packed rows, fused loss, bf16 weights with fp32
masters) train the same synthetic OneVision mixture; printed per path: tokens/s, MFU, peak memory and the ratios.
--loader streams that mixture from shards through training's own loader, locally and over loopback HTTP. The method
and the goals: docs/PERFORMANCE.md ("Method of the benchmark", "The data loader").
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from ov_train.bench.balance import balance_bench
from ov_train.bench.extraction import extraction_bench
from ov_train.bench.goals import report
from ov_train.bench.loader import loader_bench
from ov_train.bench.model import model_bench
from ov_train.bench.pairs import pair_bench
from ov_train.config.compose import compose
from ov_train.config.options import cpu_share
from ov_train.config.run_plan import resolve_plan
from ov_train.constants import CHECKPOINTABLE
from ov_train.devices import DEVICES
from ov_train.model.build import build_model
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m ov_train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny geometry on CPU (CI smoke run)")
    p.add_argument("--model", default="ov_qwen2_0_5b", help="a shipped model config (model=NAME), built from random init")
    p.add_argument("--samples", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--max-tokens", default=None,
                   help="tokens per packed row, or a comma list run one after another, e.g. 8192,16384,32768 (default: the model config's)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile each tower and LLM layer (ov_train path)")
    p.add_argument("--checkpoint", default="", help=f"comma list of {CHECKPOINTABLE} to checkpoint (ov_train path)")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=None, help="rows per chunked-loss chunk (default: the model config's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="MFU denominator (default: the GPU's bf16 peak in ov_train/devices.py, or measured on CPU)")
    p.add_argument("--adapter", choices=("lora", "dora"), default=None,
                   help="also train through these adapters (conf/shared/adapter_lora.yaml's targets) and compare with full fine-tuning")
    p.add_argument("--adapter-rank", type=int, default=None, help="the adapters' rank (default: conf/shared/adapter_lora.yaml's)")
    p.add_argument("--loader", nargs="?", const=True, default=False, metavar="DIR",
                   help="benchmark the data loader alone (no model); with DIR, the CPU cost per sample and cores per GPU"
                        " on the onevision shards in DIR, against the reference extraction (bench/extraction.py)")
    p.add_argument("--device", default="h100", choices=sorted(DEVICES), help="the GPU --loader DIR feeds")
    p.add_argument("--mfu", type=float, default=0.45, help="the MFU that GPU trains at (--loader DIR)")
    p.add_argument("--both", action="store_true", help="the model bench and the loader bench, and their tokens/s ratio")
    p.add_argument("--loader-workers", type=int, default=None, help="loader worker processes (default 8; 0 with --tiny)")
    p.add_argument("--loader-samples", type=int, default=None, help="samples written to shards (default 16 per worker, at least 32)")
    p.add_argument("--loader-batches", type=int, default=None, help="timed loader batches (default 32; 2 with --tiny)")
    p.add_argument("--pairs", action="store_true",
                   help="DPO steps on preference pairs: the media encoded once per pair against twice (bench/pairs.py)")
    p.add_argument("--balance", action="store_true",
                   help="simulate data-parallel ranks on the OneVision mix: token against compute budgets (bench/balance.py)")
    p.add_argument("--balance-ranks", type=int, default=8)
    p.add_argument("--balance-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--goals", type=Path, default=None, metavar="DIR",
                   help="report the performance goals against the --json files in DIR, and run nothing")
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    args.loader = args.loader or args.both
    if args.loader_workers is None:
        args.loader_workers = 0 if args.tiny else 8
    on_dir = isinstance(args.loader, str)
    args.loader_samples = args.loader_samples or (12 if on_dir else max(32, 16 * args.loader_workers))
    args.loader_batches = args.loader_batches or (2 if args.tiny else 32)
    return args


def main(argv=None) -> list:
    args = _parse(argv)
    if args.goals:
        return report(args.goals)
    if args.balance:
        results = balance_bench(args)
        if args.json:
            args.json.write_text(json.dumps({"argv": argv if argv is not None else sys.argv[1:], "results": results}, indent=2))
        return results
    torch.manual_seed(args.seed)
    # Torch threads as a training run of this process sizes them (config/options.py cpu_share: the CPUs it may use,
    # less its loader workers), so the bench's figures are the run's: threads on every usable CPU spin while
    # another process holds one (8x slower beside one busy process on 2 cores).
    share = cpu_share(None, local_processes=1)
    torch.set_num_threads(share.threads)
    print(share.describe())
    # The run plan training resolves for this model (the onevision stage's media and template, the model's forward).
    plan = resolve_plan(compose([f"model={args.model}", "model.random_init=true"]))
    with_model = args.both or not args.loader
    # The loader alone needs only the tokenizer and the geometry: the model is built without weights.
    with nullcontext() if with_model else torch.device("meta"):
        model, tokenizer = build_model(plan.model, cache_dir())
    results = []
    # The loader runs first, so its workers fork before the model moves to the GPU.
    if isinstance(args.loader, str):
        results += extraction_bench(args, plan, tokenizer, VisionGeometry.from_model_config(model.config), model.config)
    elif args.loader:
        results += loader_bench(args, tokenizer, VisionGeometry.from_model_config(model.config))
    if with_model:
        results += (pair_bench if args.pairs else model_bench)(args, plan, model, tokenizer)
    if args.both:
        loader, ours = results[0], [r for r in results if r["name"] == "ov_train"][-1]
        print(f"loader / ov_train tokens/s {loader['tokens_per_s'] / ours['tokens_per_s']:.2f}x (goal: at least 1.5x)")
    if args.json:
        args.json.write_text(json.dumps({"argv": argv if argv is not None else sys.argv[1:], "results": results}, indent=2))
    return results
