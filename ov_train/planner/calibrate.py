"""The plan of a training step against the memory the same step takes when it runs (CPU, or one GPU).

    python -m ov_train.planner.calibrate --model tiny --tokens 2048
    python -m ov_train.planner.calibrate --model mid --tokens 4096 --checkpoint vision,llm --json
    python -m ov_train.planner.calibrate --device cuda --model ov_qwen2_0_5b --tokens 8192,16384,32768

Builds the model with real (random) weights, runs the step the planner traces (same samples, same
forward options, as training runs them there: fp32 and sdpa on the CPU; bf16 weights, varlen attention and
Liger's loss on one GPU) and measures what the step adds above the weights: the batch, activations and
gradients. The plan's figure is the trace's peak of that same memory.
- GPU: torch.cuda.max_memory_allocated during the step, less what was allocated before it.
- CPU: the process's peak resident set (VmHWM, reset after a first, smaller step) above what it held before
  the step. glibc is told to serve every allocation of 64 KiB or more with a mapping of its own
  (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and it follows the allocated
  bytes; the command re-executes itself with that set, and torch runs on one thread (per-thread scratch
  buffers are not the step's).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

MMAP_THRESHOLD = "65536"
# A mid-size geometry: the real crop (384 px, 14 px patches: 729 patches per crop), fewer and narrower layers.
MID = [
    "model.vision.hidden_size=384", "model.vision.intermediate_size=1536", "model.vision.num_hidden_layers=4",
    "model.vision.num_attention_heads=6", "model.vision.image_size=384", "model.vision.patch_size=14",
    "model.text.hidden_size=512", "model.text.intermediate_size=1408", "model.text.num_hidden_layers=6",
    "model.text.num_attention_heads=8", "model.text.num_key_value_heads=2", "+model.text.vocab_size=32000",
    "model.text.max_position_embeddings=32768",
]


def overrides(model: str, tokens: int, checkpoint: str | None, device: str = "cpu") -> list[str]:
    """The training config of a run of `model` (tiny, mid or a conf/model name, random weights) on `device`
    whose steps hold `tokens` tokens in one row; `checkpoint`: a comma list, `none`, or None (the config's)."""
    out = ["model=tiny", *MID] if model == "mid" else [f"model={model}", "model.random_init=true"]
    out += ["trainer.accelerator=cpu", "plan.device=cpu"] if device == "cpu" else ["trainer.accelerator=gpu", "trainer.devices=1"]
    if checkpoint is not None:
        out.append(f"model.activation_checkpointing=[{'' if checkpoint == 'none' else checkpoint}]")
    return out + [f"plan.tokens={tokens}", f"model.max_tokens={tokens}"]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS:")


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM:")


def measure(model_plan, parts: dict, samples, options, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes the step adds at its peak above the weights: batch, activations, gradients (real weights)."""
    from ov_train.model.build import build_model
    from ov_train.model.forward import prepare_model
    from ov_train.model.parts import apply_stage
    from ov_train.planner.trace import _ours_step
    from ov_train.planner.workload import collated
    from ov_train.utils.paths import cache_dir

    torch.manual_seed(0)
    model, _ = build_model(replace(model_plan, route="random"), cache_dir())
    model.to(device=device, dtype=dtype).train()
    apply_stage(model, parts)
    prepare_model(model, options)
    side = model.config.vision_config.image_size
    ids = (model.config.image_token_id, model.config.video_token_id)
    pixels = lambda n: torch.zeros((n, 3, side, side), device=device, dtype=dtype)  # noqa: E731

    def batch(of):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated(of, *ids, pixels).items()}

    _ours_step(model, batch([min(samples, key=lambda s: s.tokens)]), options).backward()  # lazy initialisations
    model.zero_grad(set_to_none=True)
    before = _reset(device)
    _ours_step(model, batch(samples), options).backward()
    measured = _peak(device) - before
    del model
    return measured


def calibrate(model: str, tokens: int, checkpoint: str | None = None, device: str = "cpu") -> dict:
    from ov_train.config.compose import compose
    from ov_train.config.run_plan import resolve_plan
    from ov_train.planner.estimate import Setup, meta_model, step_samples
    from ov_train.planner.trace import COMPUTE, trace_step
    from ov_train.vision.geometry import VisionGeometry

    setup = Setup.of(resolve_plan(compose(overrides(model, tokens, checkpoint, device)), machine=False))
    meta = meta_model(setup.model)
    samples = step_samples(setup, VisionGeometry.from_model_config(meta.config))
    trace = trace_step(meta, setup.parts, samples, setup.options, setup.engine.compute, setup.path, setup.fused_loss)
    dtype = COMPUTE[setup.engine.compute][0]
    measured = measure(setup.model, setup.parts, samples, setup.options, torch.device(device), dtype)
    planned = trace.activations_with_gradients
    return {
        "model": model, "tokens": tokens, "device": setup.device.name,
        "checkpointing": "+".join(setup.options.activation_checkpointing) or "none",
        "attention": setup.options.attention(), "fused_loss": setup.fused_loss, "compute": setup.engine.compute,
        "planned_bytes": planned, "measured_bytes": measured, "ratio": round(planned / measured, 3),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m ov_train.planner.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, mid or a conf/model name (random weights)")
    p.add_argument("--tokens", default="2048", help="tokens per step, or a comma list")
    p.add_argument("--checkpoint", default=None, help="comma list of vision, llm, or none (default: the model config's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1")
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "ov_train.planner.calibrate", *argv], env)
    if args.device == "cpu":
        torch.set_num_threads(1)
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        gc.collect()  # an earlier size's model, also after an out-of-memory error
        if args.device == "cuda":
            torch.cuda.empty_cache()
        try:
            out = calibrate(args.model, tokens, args.checkpoint, args.device)
        except torch.cuda.OutOfMemoryError as err:  # the plan said so, or it is wrong: either way, on to the next
            print(f"{args.model} {tokens} tokens: out of memory ({str(err).splitlines()[0]})", flush=True)
            continue
        print(f"{out['model']} {out['tokens']} tokens on {out['device']}, checkpointing {out['checkpointing']}: planned "
              f"{out['planned_bytes'] / 2**20:.1f} MiB, measured {out['measured_bytes'] / 2**20:.1f} MiB "
              f"(planned / measured {out['ratio']})", flush=True)
        results.append(out)
        if args.json:  # after each size, so a cut-short run keeps what finished
            args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
