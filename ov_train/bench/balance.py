"""Rank balance, simulated: 8 data-parallel ranks on the OneVision mix, token budget against compute budget.

    python -m ov_train.bench --balance                     # OV-0.5B and OV-7B, 8 ranks, 3,000 steps
    python -m ov_train.bench --balance --balance-steps 500 --model ov_qwen2_7b

Each rank draws its own samples (its own seed) of the onevision stage's mix at the model's geometry: 31.2% single
images (anyres_max_9 at photo and scan sizes), 43.0% multi-image (2 to 8 padded crops), 25.9% video (8 to 32 frames
of 196 tokens); 40 to 600 text tokens each. Each rank's batches come from training's own batchers: `fill_batches` on
the TokenBudget (data.batching=tokens) or `fill_compute_batches` on the same number of LLM-token equivalents
(data.batching=compute). A step takes as long as its batch's training FLOPs (utils/flops.py, every part training);
the step of all ranks takes as long as the slowest. Printed per budget: the median and p95 of max/mean over the
ranks, the share of rank time spent idle (1 - sum of means / sum of maxima) and the real tokens per batch.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from ov_train.config.compose import compose
from ov_train.config.options import TokenBudget
from ov_train.config.run_plan import resolve_plan
from ov_train.constants import PARTS
from ov_train.data.batching import fill_batches
from ov_train.data.compute_batches import SampleCost, fill_compute_batches
from ov_train.planner.workload import IMAGE_SIZES as EXAMPLE_SIZES
from ov_train.planner.workload import ONEVISION_MIX
from ov_train.utils.flops import ModelFlops, TokenCounts
from ov_train.vision.geometry import VisionGeometry, default_pinpoints
from ov_train.vision.tokens import anyres_tokens, best_resolution, single_crop_tokens, video_tokens

# Height x width of single images: the planner's examples (smallest first), a phone photo and an A4 scan at 300 dpi.
IMAGE_SIZES = (*sorted(EXAMPLE_SIZES), (3000, 4000), (3508, 2480))


def model_config(name: str) -> LlavaOnevisionConfig:
    """A shipped model config's LlavaOnevisionConfig, without weights or a tokenizer."""
    plan = resolve_plan(compose([f"model={name}"]), machine=False).model  # a geometry: no weights needed
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(vision_use_head=False, **plan.vision).to_dict(),
        text_config=Qwen2Config(**plan.text).to_dict(), vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


def mix_samples(geometry: VisionGeometry, seed: int):
    """Endless (crops and frames, tokens) of the OneVision mix, as dicts the batchers read."""
    rng = np.random.default_rng(seed)
    kinds, weights = list(ONEVISION_MIX), np.array(list(ONEVISION_MIX.values()))
    while True:
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        text = int(rng.integers(40, 601))
        if kind == "single_image":
            h, w = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
            canvas_h, canvas_w = best_resolution(h, w, geometry)
            images = 1 + (canvas_h // geometry.image_size) * (canvas_w // geometry.image_size)
            visual = anyres_tokens(h, w, geometry)
        elif kind == "multi_image":
            images = int(rng.integers(2, 9))
            visual = images * single_crop_tokens(geometry)
        else:
            images = int(rng.integers(8, 33))
            visual = video_tokens(images, geometry)
        n = visual + text
        # `input_ids` only needs a length here.
        yield {"input_ids": range(n), "counts": TokenCounts(images, n, n * (n + 1) / 2), "modality": kind}


def simulate(config, ranks: int, steps: int, budget_tokens: int, batching: str, seed: int = 0) -> dict:
    """Per-step max/mean over `ranks` of predicted step FLOPs, for one batching, and the batches' real tokens."""
    flops = ModelFlops.from_config(config)
    trainable = set(PARTS)
    cost = SampleCost(flops, frozenset(trainable))
    geometry = VisionGeometry(config.vision_config.image_size, config.vision_config.patch_size,
                              default_pinpoints(config.vision_config.image_size))
    budget = TokenBudget(max_tokens=budget_tokens)
    per_rank, tokens = [], []
    for rank in range(ranks):
        samples = mix_samples(geometry, seed * 1000 + rank)
        if batching == "tokens":
            batches = fill_batches(samples, budget)
        else:
            batches = fill_compute_batches(samples, budget, lambda e: cost.counts_cost(e["counts"]))
        costs = []
        for _ in range(steps):
            batch, _ = next(batches)
            total = TokenCounts(*(sum(getattr(e["counts"], f) for e in batch) for f in ("images", "tokens", "pairs")))
            costs.append(flops.train_step(total, trainable))
            tokens.append(total.tokens)
        per_rank.append(costs)
    step = torch.tensor(per_rank, dtype=torch.float64)  # [ranks, steps]
    maxima, means = step.max(0).values, step.mean(0)
    ratio = (maxima / means).numpy()
    return {
        "batching": batching,
        "median": float(np.median(ratio)),
        "p95": float(np.percentile(ratio, 95)),
        "idle": float(1 - means.sum() / maxima.sum()),
        "tokens_per_batch": float(np.mean(tokens)),
    }


def balance_bench(args) -> list[dict]:
    names = [args.model] if args.model != "ov_qwen2_0_5b" else ["ov_qwen2_0_5b", "ov_qwen2_7b"]
    budget = int(args.max_tokens or 32768)
    print(f"rank balance: {args.balance_ranks} ranks, {args.balance_steps} steps, budget {budget} tokens (or their"
          " worth of compute), OneVision mix; step time from training FLOPs")
    results = []
    for name in names:
        config = model_config(name)
        for batching in ("tokens", "compute"):
            r = simulate(config, args.balance_ranks, args.balance_steps, budget, batching, args.seed)
            print(f"{name:<14} {batching:<8} max/mean median {r['median']:.3f}  p95 {r['p95']:.3f}  "
                  f"idle {100 * r['idle']:.1f}%  real tokens/batch {r['tokens_per_batch']:.0f}")
            results.append({"name": f"balance_{name}_{batching}", "model": name, **r})
    return results
