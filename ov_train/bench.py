"""Training throughput: the stock transformers recipe against ov_train's path, in one process.

    python -m ov_train.bench                 # OV-0.5B geometry (random init) on the GPU
    python -m ov_train.bench --tiny          # tiny geometry on CPU, seconds (CI)
    python -m ov_train.bench --loader        # the data loader alone: what it delivers per second
    python -m ov_train.bench --both          # model bench and loader; ratio loader / ov_train tokens/s

Both paths train the same synthetic OneVision mixture (31.2% single image, 43.0% multi-image,
25.9% video) for the same steps of `--samples` samples each:
- stock: batch 1 with gradient accumulation, each sample through
  LlavaOnevisionForConditionalGeneration.forward with full logits and its loss; fp32 weights
  (bf16 autocast on GPU), AdamW.
- ov_train: samples packed into rows of up to `--max-tokens` (one forward/backward per row),
  varlen attention on GPU, chunked (CPU) or Liger fused (GPU) linear cross-entropy, no tower
  layer past the feature layer; on GPU bf16 weights with fp32 master weights in the optimizer;
  optionally each layer torch.compile'd and activation checkpointing.
Printed per path: tokens/s (real tokens, no padding), MFU (model FLOPs of those tokens by
ov_train.utils.flops, every part training), peak memory, and the ratios ov_train / stock.

--loader writes the same mixture into temporary WebDataset shards laid out as the onevision recipe
expects and streams them through training's own loader (OneVisionData: recipe sources, MixedStream,
SampleProcessor, token-budget batches) with `--loader-workers` workers and no model; printed are the
samples/s and tokens/s (no padding) it delivers after every worker's first batch. The goal: at least
1.5x the tokens/s the GPU consumes (printed with --both).
"""
from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ov_train.data.samples import SampleProcessor, collate, stock_inputs
from ov_train.data.shard_writer import ShardWriter
from ov_train.data.video import encode_mp4
from ov_train.model.build import build_model
from ov_train.model.checkpointing import CHECKPOINTABLE, module_layers
from ov_train.model.forward import ForwardOptions, sample_losses
from ov_train.model.packing import IGNORE_INDEX, plan_rows
from ov_train.training.datamodule import OneVisionData
from ov_train.training.metrics import batch_counts
from ov_train.utils.flops import FORWARD_ORDER, ModelFlops, TokenCounts
from ov_train.utils.paths import cache_dir
from ov_train.vision.geometry import VisionGeometry

CONF = Path(__file__).resolve().parents[1] / "conf"
MIXTURE = {"single_image": 0.312, "multi_image": 0.430, "video": 0.259}
# Height x width of the recipe's anyres examples at the 384 px geometry.
IMAGE_SIZES = ((384, 384), (480, 640), (1024, 768), (1080, 1920), (3000, 800))
WORDS = ("the", "shape", "is", "red", "blue", "circle", "square", "left", "right", "one", "two", "image", "video")
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM


def _png(height: int, width: int) -> bytes:
    pixels = np.linspace(0, 255, height * width * 3).reshape(height, width, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_mixture(count: int, image_size: int, seed: int) -> list[dict]:
    """Raw LLaVA samples of the OneVision mixture; image sizes scaled from 384 px crops to `image_size`."""
    rng = np.random.default_rng(seed)
    scale = image_size / 384
    kinds = list(MIXTURE)
    weights = np.array(list(MIXTURE.values()))
    raws = []
    for i in range(count):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        raw = {"__key__": f"bench{i}"}
        if kind == "video":
            frames = np.full((int(rng.integers(8, 33)), image_size, image_size, 3), 128, dtype=np.uint8)
            raw["mp4"], prompt = encode_mp4(frames, fps=1), "<video>\nDescribe the video."
        else:
            n = 1 if kind == "single_image" else int(rng.integers(2, 9))
            for k in range(n):
                h, w = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
                raw[f"img{k}.png"] = _png(max(1, round(h * scale)), max(1, round(w * scale)))
            prompt = "<image>\n" * n + "Describe the images."
        reply = " ".join(rng.choice(WORDS, size=int(rng.integers(40, 200))))
        conversations = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        raw["json"] = json.dumps({"conversations": conversations, "modality": kind}).encode()
        raws.append(raw)
    return raws


def token_counts(example: dict) -> TokenCounts:
    """What one sample feeds the model: crops and frames through the tower, tokens, causal pairs."""
    images = sum(img.pixel_values.shape[0] for img in example["images"])
    images += 0 if example["frames"] is None else example["frames"].shape[0]
    n = len(example["input_ids"])
    return TokenCounts(images=images, tokens=n, pairs=n * (n + 1) / 2)


class MasterWeightAdamW:
    """AdamW on fp32 master copies of bf16 parameters: the model computes in bf16, updates accumulate in
    fp32 (small steps vanish when added to bf16 weights)."""

    def __init__(self, params, lr: float):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, fused=self.master[0].is_cuda)

    @torch.no_grad()
    def step(self):
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        torch._foreach_copy_(self.params, self.master)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _stock_step(model, examples, pad_id, device, autocast):
    for example in examples:
        batch = _to(collate([example], pad_id), device)
        with autocast():
            out = model(**stock_inputs(batch), labels=batch["labels"])
        (out.loss / len(examples)).backward()


def _ours_step(model, examples, pad_id, device, options):
    rows = plan_rows([len(e["input_ids"]) for e in examples], options.max_tokens)
    supervised = sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in examples)
    for row in rows:
        batch = _to(collate([examples[i] for i in row], pad_id), device)
        sums, _, _ = sample_losses(model, batch, options)
        (sums.sum() / supervised).backward()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # Hand freed heap back to the OS first, so the earlier path's leftovers do not count, then
        # reset the process's peak resident set (VmHWM).
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _measured_peak_tflops(device) -> float:
    """Peak for MFU off the GPU: this machine's best fp32 matrix-product rate (best of 20, as other
    processes may share the cores)."""
    a = torch.randn(1024, 1024, device=device)
    best = float("inf")
    for _ in range(21):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e12


def _run(name, step, optimizer, groups, args, device, flops, tokens) -> dict:
    _reset_peak(device)
    elapsed = 0.0
    for i, examples in enumerate(groups):
        start = time.perf_counter()
        step(examples)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            elapsed += time.perf_counter() - start
    timed = groups[args.warmup:]
    total_tokens = sum(tokens(e) for g in timed for e in g)
    total_flops = sum(flops(e) for g in timed for e in g)
    return {
        "name": name,
        "tokens_per_s": total_tokens / elapsed,
        "mfu": total_flops / elapsed / (args.peak_tflops * 1e12),
        "peak_gib": _peak_gib(device),
    }


def write_mixture_shards(raws: list[dict], root: Path, shards_per_source: int) -> int:
    """The raw samples as the onevision recipe's sources, ROOT/onevision/<modality>/train-*.tar, in at
    least `shards_per_source` shards each, so that every loader worker reads whole shards of its own.
    Returns the number of shards written."""
    shards = 0
    by_modality: dict[str, list[dict]] = {m: [] for m in MIXTURE}
    for raw in raws:
        by_modality[json.loads(raw["json"])["modality"]].append(raw)
    for modality, group in by_modality.items():
        per_shard = max(1, len(group) // shards_per_source)
        with ShardWriter(root / "onevision" / modality, "train", samples_per_shard=per_shard) as writer:
            for raw in group:
                writer.write(raw)
        shards += len(writer.shards)
    return shards


def _loader_bench(args, tokenizer, geometry) -> dict:
    """Training's own train loader over shards of the synthetic mixture: samples and tokens delivered per second."""
    workers = args.loader_workers
    with tempfile.TemporaryDirectory(prefix="ov_bench_shards_") as root:
        raws = synthetic_mixture(args.loader_samples, geometry.image_size, args.seed)
        shards = write_mixture_shards(raws, Path(root), max(1, workers))
        del raws  # the shards hold them now; the forked workers need no copy
        data_cfg = OmegaConf.merge(
            OmegaConf.load(CONF / "data" / "recipe.yaml"), {"recipe": "onevision", "root": root, "num_workers": workers}
        )
        stage_cfg = OmegaConf.load(CONF / "stage" / "onevision.yaml")
        data = OneVisionData(data_cfg, stage_cfg, tokenizer, geometry, args.seed)
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


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m ov_train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny geometry on CPU (CI smoke run)")
    p.add_argument("--model", default="ov_qwen2_0_5b", help="conf/model/<name>.yaml, built from random init")
    p.add_argument("--samples", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per packed row, 8k..32k on GPU (default: the model config's)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile each tower and LLM layer (ov_train path)")
    p.add_argument("--checkpoint", default="", help=f"comma list of {CHECKPOINTABLE} to checkpoint (ov_train path)")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=None, help="rows per chunked-loss chunk (default: the model config's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator (default: H100 bf16, or measured on CPU)")
    p.add_argument("--loader", action="store_true", help="benchmark the data loader alone (no model)")
    p.add_argument("--both", action="store_true", help="the model bench and the loader bench, and their tokens/s ratio")
    p.add_argument("--loader-workers", type=int, default=None, help="loader worker processes (default 8; 0 with --tiny)")
    p.add_argument("--loader-samples", type=int, default=None, help="samples written to shards (default 16 per worker, at least 32)")
    p.add_argument("--loader-batches", type=int, default=None, help="timed loader batches (default 32; 2 with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    args.loader = args.loader or args.both
    if args.loader_workers is None:
        args.loader_workers = 0 if args.tiny else 8
    args.loader_samples = args.loader_samples or max(32, 16 * args.loader_workers)
    args.loader_batches = args.loader_batches or (2 if args.tiny else 32)
    return args


def _model_bench(args, cfg, model, tokenizer) -> list[dict]:
    """Stock recipe and ov_train's path, training the same samples; prints and returns both."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.max_tokens = args.max_tokens or cfg.max_tokens
    args.loss_chunk = args.loss_chunk or cfg.loss_chunk
    model.to(device).train()
    if args.peak_tflops is None:
        args.peak_tflops = H100_BF16_TFLOPS if device.type == "cuda" else _measured_peak_tflops(device)
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, "qwen_1_5", cfg.vision_aspect_ratio, max_frames=32, max_length=32768)
    raws = synthetic_mixture(args.samples * (args.warmup + args.steps), geometry.image_size, args.seed)
    examples = [process(r) for r in raws]
    groups = [examples[i : i + args.samples] for i in range(0, len(examples), args.samples)]
    pad_id = tokenizer.pad_token_id
    model_flops = ModelFlops.from_config(model.config)
    flops = lambda e: model_flops.train_step(token_counts(e), set(FORWARD_ORDER))  # noqa: E731  (all parts train)
    tokens = lambda e: len(e["input_ids"])  # noqa: E731
    gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    stock = _run("stock", lambda ex: _stock_step(model, ex, pad_id, device, autocast), optimizer, groups, args, device, flops, tokens)
    del optimizer

    options = ForwardOptions(
        packing=True, max_tokens=args.max_tokens, loss="chunked", loss_chunk=args.loss_chunk,
        activation_checkpointing=tuple(m for m in args.checkpoint.split(",") if m), checkpoint_every=args.checkpoint_every,
    )
    options.prepare(model)
    if gpu:
        model.to(torch.bfloat16)
        optimizer = MasterWeightAdamW(model.parameters(), lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if args.compile:
        for module in CHECKPOINTABLE:
            for layer in module_layers(model, module):
                layer.compile(dynamic=True)  # packed rows change length every step
    ours = _run("ov_train", lambda ex: _ours_step(model, ex, pad_id, device, options), optimizer, groups, args, device, flops, tokens)

    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}  model: {args.model} (random init)  "
          f"samples/step: {args.samples}  steps: {args.steps} (+{args.warmup} warmup)  max tokens/row: {args.max_tokens}  "
          f"compile: {args.compile}  checkpointing: {options.activation_checkpointing or 'none'}  "
          f"MFU peak: {args.peak_tflops:.3g} TFLOP/s")
    print(f"tokens/step: {sum(tokens(e) for g in groups for e in g) / len(groups):.0f}  "
          f"attention: {options.attention()}  peak memory: {'allocated' if gpu else 'process RSS'}")
    for r in (stock, ours):
        print(f"{r['name']:<9} tokens/s {r['tokens_per_s']:.1f}  MFU {100 * r['mfu']:.2f}%  peak memory {r['peak_gib']:.2f} GiB")
    print(f"{'ratio':<9} tokens/s {ours['tokens_per_s'] / stock['tokens_per_s']:.2f}x  "
          f"MFU {ours['mfu'] / stock['mfu']:.2f}x  peak memory {ours['peak_gib'] / stock['peak_gib']:.2f}x")
    return [stock, ours]


def main(argv=None) -> list[dict]:
    args = _parse(argv)
    torch.manual_seed(args.seed)
    cfg = OmegaConf.load(CONF / "model" / f"{args.model}.yaml")
    cfg.random_init, cfg.pretrained, cfg.init_from = True, None, None
    model_bench = args.both or not args.loader
    # The loader alone needs only the tokenizer and the geometry: the model is built without weights.
    with nullcontext() if model_bench else torch.device("meta"):
        model, tokenizer = build_model(cfg, cache_dir())
    results = []
    # The loader runs first, so its workers fork before the model moves to the GPU.
    if args.loader:
        results.append(_loader_bench(args, tokenizer, VisionGeometry.from_model_config(model.config)))
    if model_bench:
        results += _model_bench(args, cfg, model, tokenizer)
    if args.both:
        loader, ours = results[0], results[-1]
        print(f"loader / ov_train tokens/s {loader['tokens_per_s'] / ours['tokens_per_s']:.2f}x (goal: at least 1.5x)")
    return results


if __name__ == "__main__":
    main()
