"""The plan of a CPU training step against the memory the same step takes when it runs.

    python -m ov_train.planner.calibrate --model tiny --tokens 2048
    python -m ov_train.planner.calibrate --model mid --tokens 4096 --checkpoint vision,llm --json

Builds the model with real (random) weights, runs the step the planner traces (same samples, same
ForwardOptions, fp32 on the CPU, as `trainer.accelerator=cpu` trains), and measures what it allocates: the
process's peak resident set (VmHWM, reset after a first, smaller step) above what it held before the step.
glibc is told to serve every allocation of 64 KiB or more with a mapping of its own (MALLOC_MMAP_THRESHOLD_),
so freed tensors leave the resident set at once and it follows the allocated bytes; the command re-executes
itself with that set, and runs torch on one thread (per-thread scratch buffers are not the step's).
The plan's figure is the trace's peak of everything but the weights: the batch, activations and gradients.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
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


def overrides(model: str, tokens: int, checkpoint: str) -> list[str]:
    """The training config of a CPU run of `model` (tiny, mid) whose steps hold `tokens` tokens in one row."""
    out = ["model=tiny", *(MID if model == "mid" else []), "trainer.accelerator=cpu", "plan.device=cpu",
           f"plan.tokens={tokens}", f"model.max_tokens={tokens}", f"model.activation_checkpointing=[{checkpoint}]"]
    return out


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(model_cfg, parts: dict, samples, options) -> int:
    """Bytes the step adds to the resident set at its peak: batch, activations, gradients (real weights, CPU)."""
    from ov_train.model.build import build_model
    from ov_train.model.parts import apply_stage
    from ov_train.planner.trace import _ours_step
    from ov_train.planner.workload import collated
    from ov_train.utils.paths import cache_dir

    torch.manual_seed(0)
    model, _ = build_model(model_cfg, cache_dir())
    model.train()
    apply_stage(model, parts)
    options.prepare(model)
    side = model.config.vision_config.image_size
    ids = (model.config.image_token_id, model.config.video_token_id)
    pixels = lambda n: torch.zeros((n, 3, side, side))  # noqa: E731
    smallest = min(samples, key=lambda s: s.tokens)
    _ours_step(model, collated([smallest], *ids, pixels), options).backward()  # lazy initialisations
    model.zero_grad(set_to_none=True)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS:")
    _ours_step(model, collated(samples, *ids, pixels), options).backward()
    return _status("VmHWM:") - before


def calibrate(model: str, tokens: int, checkpoint: str = "") -> dict:
    from ov_train.planner.cli import compose
    from ov_train.planner.estimate import Setup, meta_model, step_samples
    from ov_train.planner.trace import trace_step
    from ov_train.vision.geometry import VisionGeometry

    cfg = compose(overrides(model, tokens, checkpoint))
    setup = Setup.from_config(cfg)
    meta = meta_model(cfg.model)
    samples = step_samples(setup, VisionGeometry.from_model_config(meta.config))
    trace = trace_step(meta, setup.parts, samples, setup.options, setup.engine.compute, setup.path, setup.fused_loss)
    measured = measure(cfg.model, setup.parts, samples, setup.options)
    planned = trace.activations_with_gradients
    return {
        "model": model, "tokens": tokens, "checkpointing": checkpoint or "none", "attention": setup.options.attention(),
        "planned_bytes": planned, "measured_bytes": measured, "ratio": round(planned / measured, 3),
    }


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m ov_train.planner.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "mid"))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--checkpoint", default="", help="comma list of vision, llm")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1")
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "ov_train.planner.calibrate", *argv], env)
    torch.set_num_threads(1)
    out = calibrate(args.model, args.tokens, args.checkpoint)
    print(json.dumps(out) if args.json else
          f"{out['model']} {out['tokens']} tokens, checkpointing {out['checkpointing']}: planned "
          f"{out['planned_bytes'] / 2**20:.1f} MiB, measured {out['measured_bytes'] / 2**20:.1f} MiB "
          f"(planned / measured {out['ratio']})")
    return out


if __name__ == "__main__":
    main()
