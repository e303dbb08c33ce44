"""The preference-pair bench (`python -m ov_train.bench --pairs`): DPO training steps on pairs of the OneVision
mixture, each pair's media encoded once (its chosen and rejected sequences read the same features) against
encoding them for both sequences, side by side: tokens/s, peak memory, the crops and frames through the tower and
the model FLOPs of a step (ov_train.utils.flops, every part training: the gain to expect where compute bounds the
step, whatever the machine's load).

Both paths run the same steps: the pairs' 2N sequences packed into rows, chunked (CPU) or fused (GPU) linear
cross-entropy, the sigmoid DPO loss against reference log-probabilities computed before timing (as a precomputed
reference gives them), backward and an AdamW step. Tokens are real tokens of both sequences, no padding.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from ov_train.bench.mixture import WORDS, synthetic_mixture
from ov_train.bench.model import _peak_gib, _reset_peak, _to
from ov_train.config.run_plan import RunPlan
from ov_train.config.schema import ModelConfig
from ov_train.constants import PARTS
from ov_train.data.pairs import PairProcessor, collate_pairs
from ov_train.data.samples import SampleProcessor
from ov_train.model.forward import prepare_model
from ov_train.model.preference import PairLogps, PreferenceSettings, pair_logps, preference_loss
from ov_train.training.optim import build_adamw
from ov_train.utils.flops import ModelFlops, TokenCounts
from ov_train.vision.geometry import VisionGeometry


def pair_mixture(count: int, image_size: int, seed: int) -> list[dict]:
    """The bench mixture's samples as preference pairs: each gets a rejected reply of random words."""
    rng = np.random.default_rng(seed + 1)
    raws = synthetic_mixture(count, image_size, seed)
    for raw in raws:
        meta = json.loads(raw["json"])
        meta["rejected"] = " ".join(rng.choice(WORDS, size=int(rng.integers(40, 200))))
        raw["json"] = json.dumps(meta).encode()
    return raws


def _counts(batch: dict) -> TokenCounts:
    """What a pair batch feeds the model: crops and frames through the tower (once or twice), tokens, causal pairs."""
    lengths = batch["attention_mask"].sum(1).tolist()
    images = sum(0 if batch[k] is None else batch[k].shape[0] for k in ("pixel_values", "video_frames"))
    return TokenCounts(images=images, tokens=sum(lengths), pairs=sum(n * (n + 1) / 2 for n in lengths))


PATHS = (("pairs/once", True), ("pairs/twice", False))


def _step(model, optimizer, pairs, reference, share, options, args, device, autocast) -> dict:
    """One DPO training step on `pairs`; returns the batch."""
    batch = _to(collate_pairs(pairs, args.pad_id, share), device)
    with autocast():
        policy, chosen_n, rejected_n = pair_logps(model, batch, options)
    preference_loss(PreferenceSettings(), policy, reference, chosen_n, rejected_n).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch


def _measure(model, groups, references, options, args, device, autocast) -> list[dict]:
    """Both paths' figures. Their steps alternate (once, twice, then twice, once, ...), so warm-up and the machine's
    load fall on both alike; peak memory comes after, from one more step of each on the largest group."""
    optimizer = build_adamw([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-6, "weight_decay": 0.0}])
    flops = ModelFlops.from_config(model.config)
    totals = {name: {"seconds": 0.0, "tokens": 0, "images": 0, "flops": 0.0} for name, _ in PATHS}
    step = partial(_step, model, optimizer, options=options, args=args, device=device, autocast=autocast)
    for i, (pairs, reference) in enumerate(zip(groups, references)):
        for name, share in PATHS if i % 2 == 0 else PATHS[::-1]:
            start = time.perf_counter()
            counts = _counts(step(pairs, reference, share))
            if i >= args.warmup:
                total = totals[name]
                total["seconds"] += time.perf_counter() - start
                total["tokens"] += counts.tokens
                total["images"] += counts.images
                total["flops"] += flops.train_step(counts, set(PARTS))
    largest = max(range(len(groups)), key=lambda i: sum(len(p["input_ids"]) + len(p["rejected_input_ids"]) for p in groups[i]))
    steps = len(groups) - args.warmup
    results = []
    for name, share in PATHS:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _reset_peak(device)
        step(groups[largest], references[largest], share)
        total = totals[name]
        results.append({"name": name, "tokens_per_s": total["tokens"] / total["seconds"], "peak_gib": _peak_gib(device),
                        "tower_inputs_per_step": total["images"] / steps, "tflops_per_step": total["flops"] / steps / 1e12})
    return results


def pair_bench(args, plan: RunPlan, model, tokenizer) -> list[dict]:
    """Both paths on the same pairs; prints and returns their figures."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    gpu = device.type == "cuda"
    model.to(device).train()
    if gpu:
        model.to(torch.bfloat16)  # bf16 weights, fp32 masters in build_adamw (trainer.precision=bf16-true)
    args.pad_id = tokenizer.pad_token_id
    max_tokens = int(str(args.max_tokens or plan.forward.max_tokens).split(",")[0])
    options = ModelConfig(packing=True, max_tokens=max_tokens, loss="chunked", loss_chunk=args.loss_chunk or plan.forward.loss_chunk)
    prepare_model(model, options)
    geometry = VisionGeometry.from_model_config(model.config)
    process = PairProcessor(SampleProcessor(tokenizer, geometry, plan.data.samples.template, plan.data.samples.media,
                                          max_length=32768))
    pairs = [process(r) for r in pair_mixture(args.samples * (args.warmup + args.steps), geometry.image_size, args.seed)]
    groups = [pairs[i : i + args.samples] for i in range(0, len(pairs), args.samples)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext
    with torch.no_grad(), autocast():  # the reference: the starting weights' log-probabilities, not timed
        references = []
        for group in groups:
            logps, _, _ = pair_logps(model, _to(collate_pairs(group, args.pad_id), device), options)
            references.append(PairLogps(logps.chosen.float(), logps.rejected.float()))
    print(f"pairs bench  device: {torch.cuda.get_device_name() if gpu else 'cpu'}  model: {args.model} (random init)  "
          f"pairs/step: {args.samples}  steps: {args.steps} (+{args.warmup} warmup)  rows of {max_tokens}  "
          f"peak memory: {'allocated' if gpu else 'process RSS'}", flush=True)
    results = _measure(model, groups, references, options, args, device, autocast)
    for r in results:
        print(f"{r['name']:<12} tokens/s {r['tokens_per_s']:.1f}  peak memory {r['peak_gib']:.2f} GiB  "
              f"tower crops+frames/step {r['tower_inputs_per_step']:.0f}  model TFLOP/step {r['tflops_per_step']:.4g}",
              flush=True)
    once, twice = results
    print(f"{'ratio':<12} tokens/s {once['tokens_per_s'] / twice['tokens_per_s']:.2f}x  "
          f"peak memory {once['peak_gib'] / twice['peak_gib']:.2f}x  "
          f"tower crops+frames/step {once['tower_inputs_per_step'] / twice['tower_inputs_per_step']:.2f}x  "
          f"model TFLOP/step {once['tflops_per_step'] / twice['tflops_per_step']:.2f}x", flush=True)
    return results
