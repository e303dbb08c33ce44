"""The model benchmark: the stock recipe's training step against ov_train's, on the same samples."""
from __future__ import annotations

import ctypes
import resource
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from ov_train import devices
from ov_train.bench.mixture import synthetic_mixture, token_counts
from ov_train.config.run_plan import RunPlan
from ov_train.config.schema import ModelConfig
from ov_train.constants import IGNORE_INDEX, PARTS
from ov_train.data.samples import SampleProcessor, collate, stock_inputs
from ov_train.model.forward import prepare_model, sample_losses
from ov_train.model.packing import plan_rows
from ov_train.training.optim import build_adamw
from ov_train.utils.flops import ModelFlops
from ov_train.vision.geometry import VisionGeometry


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
        "trainable_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        # AdamW's moments (and fp32 masters under bf16): what training checkpoints besides the trainable weights.
        "optimizer_state_gib": sum(t.nelement() * t.element_size() for state in optimizer.state.values()
                                   for t in state.values() if isinstance(t, torch.Tensor)) / 2**30,
    }


def _ours(args, max_tokens: int) -> ModelConfig:
    options = ModelConfig(
        packing=True, max_tokens=max_tokens, loss="chunked", loss_chunk=args.loss_chunk,
        activation_checkpointing=[m for m in args.checkpoint.split(",") if m],
        checkpoint_every=args.checkpoint_every, compile=args.compile,
    )
    problems = options.problems()
    if problems:
        raise SystemExit("bench: " + "; ".join(problems))
    return options


def _print(r: dict, stock: dict | None = None) -> None:
    rows = f"  rows of {r['max_tokens']}" if "max_tokens" in r else ""
    print(f"{r['name']:<9} tokens/s {r['tokens_per_s']:.1f}  MFU {100 * r['mfu']:.2f}%  peak memory {r['peak_gib']:.2f} GiB{rows}")
    if stock is not None:
        print(f"{'ratio':<9} tokens/s {r['tokens_per_s'] / stock['tokens_per_s']:.2f}x  MFU {r['mfu'] / stock['mfu']:.2f}x  "
              f"peak memory {r['peak_gib'] / stock['peak_gib']:.2f}x{rows}")


def model_bench(args, plan: RunPlan, model, tokenizer) -> list[dict]:
    """The stock recipe, then ov_train's path once per row size, training the same samples; prints and returns them."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    row_sizes = [int(t) for t in str(args.max_tokens or plan.forward.max_tokens).split(",")]
    args.loss_chunk = args.loss_chunk or plan.forward.loss_chunk
    model.to(device).train()
    if args.peak_tflops is None:
        gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        args.peak_tflops = devices.peak_tflops(gpu_name)[0] if gpu_name else _measured_peak_tflops(device)
    geometry = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geometry, plan.data.samples.template, plan.data.samples.media, max_length=32768)
    raws = synthetic_mixture(args.samples * (args.warmup + args.steps), geometry.image_size, args.seed)
    examples = [process(r) for r in raws]
    groups = [examples[i : i + args.samples] for i in range(0, len(examples), args.samples)]
    pad_id = tokenizer.pad_token_id
    model_flops = ModelFlops.from_config(model.config)
    flops = lambda e: model_flops.train_step(token_counts(e), set(PARTS))  # noqa: E731  (all parts train)
    tokens = lambda e: len(e["input_ids"])  # noqa: E731
    gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext
    print(f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}  model: {args.model} (random init)  "
          f"samples/step: {args.samples}  steps: {args.steps} (+{args.warmup} warmup)  "
          f"tokens/step: {sum(tokens(e) for g in groups for e in g) / len(groups):.0f}  MFU peak: {args.peak_tflops:.3g} TFLOP/s  "
          f"peak memory: {'allocated' if gpu else 'process RSS'}", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
    stock = _run("stock", lambda ex: _stock_step(model, ex, pad_id, device, autocast), optimizer, groups, args, device, flops, tokens)
    del optimizer
    _print(stock)

    # ov_train's training path: bf16 weights on the GPU, so build_adamw keeps fp32 masters (trainer.precision=bf16-true).
    if gpu:
        model.to(torch.bfloat16)
    results = [stock]
    for max_tokens in row_sizes:
        options = _ours(args, max_tokens)
        if len(results) == 1:
            prepare_model(model, options)  # attention, checkpointing and compilation are set once
            print(f"ov_train: attention {options.attention()}  compile: {options.compile}  "
                  f"checkpointing: {options.activation_checkpointing or 'none'}", flush=True)
        if gpu:
            torch.cuda.empty_cache()
        optimizer = build_adamw([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5, "weight_decay": 0.0}])
        step = partial(_ours_step, model, pad_id=pad_id, device=device, options=options)
        ours = _run("ov_train", step, optimizer, groups, args, device, flops, tokens)
        del optimizer
        ours["max_tokens"] = max_tokens
        _print(ours, stock)
        results.append(ours)
    if args.adapter:
        results.append(_adapter_row(args, model, results[1], lambda opt, name, step: _run(
            name, step, opt, groups, args, device, flops, tokens), lambda ex, o: _ours_step(model, ex, pad_id, device, o)))
    if len(row_sizes) > 1:
        rates = [r["tokens_per_s"] for r in results[1:] if r["name"] == "ov_train"]
        print(f"ov_train tokens/s across rows of {min(row_sizes)}..{max(row_sizes)}: slowest {100 * (1 - min(rates) / max(rates)):.1f}% "
              "below fastest (goal: within 15%)")
    return results


def _adapter_row(args, model, full: dict, run, step) -> dict:
    """ov_train's path again at the first row size, with `--adapter` placed as `adapter=<kind>` places it (every part
    training in the full row: here the LLM through adapters, the projector a trained copy, the tower frozen); prints
    trainable parameters, optimizer state and peak memory against full fine-tuning."""
    from ov_train.model.adapters import wrap
    from ov_train.model.parts import apply_stage

    adapter = adapter_plan_of(args.adapter, args.adapter_rank)
    wrap(model, adapter)
    groups, _ = apply_stage(model, adapter.part_lrs(dict.fromkeys(PARTS, 1e-5)), adapted=adapter.adapted)
    options = _ours(args, full["max_tokens"])
    row = run(build_adamw(groups), args.adapter, lambda ex: step(ex, options))
    row["max_tokens"] = full["max_tokens"]
    for r in (full, row):
        print(f"{r['name'] + ' ' + ('full' if r is full else f'r={adapter.r}'):<14} trainable {r['trainable_params']:>13,}"
              f"  optimizer state {r['optimizer_state_gib']:.4f} GiB  peak memory {r['peak_gib']:.2f} GiB"
              f"  tokens/s {r['tokens_per_s']:.1f}")
    print(f"{'ratio':<14} trainable {row['trainable_params'] / full['trainable_params']:.4f}x  optimizer state "
          f"{row['optimizer_state_gib'] / full['optimizer_state_gib']:.4f}x  peak memory {row['peak_gib'] / full['peak_gib']:.2f}x")
    return row


def adapter_plan_of(kind: str, rank: int | None):
    """`adapter=<kind>`'s settings (conf/shared/adapter_lora.yaml: targets, alpha, dropout), at `rank`, with every part training."""
    from ov_train.config.adapter import adapter_plan
    from ov_train.config.compose import compose

    node = compose([f"adapter={kind}", *([f"adapter.r={rank}"] if rank else [])]).adapter
    return adapter_plan(node, dict.fromkeys(PARTS, 1e-5), base={})
