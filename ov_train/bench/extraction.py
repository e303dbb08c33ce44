"""What feeding a GPU costs in CPU: ov_train's sample processing (data.decode=exact and fast; with torchvision
installed, fast also without it: `fast PIL`) against the reference extraction (PIL decode + transformers'
LlavaOnevisionImageProcessorPil, decord frame by frame + the stock video processor), sample by sample on the same raw
samples, alternated in one process.

    python -m ov_train.bench --loader DIR [--device h100] [--model ov_qwen2_0_5b] [--mfu 0.45]

DIR holds the onevision recipe's shards (DIR/onevision/{single_image,multi_image,video}/*.tar; scripts/make_media.py
writes realistic ones). Each path's CPU time per sample (process CPU time, decoder threads included) is averaged
per modality and weighed by the recipe's mix; the GPU's appetite is the device's peak at the given MFU over the
training FLOPs of an average sample (utils/flops.py, every part training). CPU cores per GPU = samples the GPU
trains per second x CPU-seconds per sample; the printed margin column is 1.5x that (the loader goal).
"""
from __future__ import annotations

import glob
import io
import time
from pathlib import Path

import decord
import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionVideoProcessor

from ov_train import devices
from ov_train.config.run_plan import RunPlan
from ov_train.constants import PARTS
from ov_train.data.compute_batches import example_counts
from ov_train.data.samples import VIDEO_FIELDS, SampleProcessor, image_fields
from ov_train.data.sources import tar_samples
from ov_train.planner.workload import ONEVISION_MIX
from ov_train.utils.flops import ModelFlops
from ov_train.vision import pixels
from ov_train.vision.tokens import video_frame_indices

MARGIN = 1.5


class WithoutTorchvision:
    """A processor run as where torchvision is not installed: data.decode=fast with PIL's decoder and resizes."""

    def __init__(self, process):
        self.process = process

    def __call__(self, raw: dict):
        installed, pixels.TORCHVISION = pixels.TORCHVISION, False
        try:
            return self.process(raw)
        finally:
            pixels.TORCHVISION = installed


class Reference:
    """The public recipe's extraction with stock tools: full decodes, the stock processors."""

    def __init__(self, geometry, max_frames: int = 32):
        s = geometry.image_size
        common = {"image_mean": list(geometry.image_mean), "image_std": list(geometry.image_std)}
        self.images = LlavaOnevisionImageProcessorPil(size={"height": s, "width": s},
                                                      image_grid_pinpoints=[list(p) for p in geometry.grid_pinpoints],
                                                      **common)
        self.video = LlavaOnevisionVideoProcessor(size={"height": s, "width": s}, **common)
        self.max_frames = max_frames

    def __call__(self, raw: dict):
        fields = image_fields(raw)
        out = None
        if fields:
            pictures = [Image.open(io.BytesIO(raw[f])).convert("RGB") for f in fields]
            # One image: anyres; several: the stock processor pads each to a square crop.
            out = self.images(images=pictures if len(pictures) == 1 else [pictures], return_tensors="pt")
        video = next((f for f in VIDEO_FIELDS if f in raw), None)
        if video:
            reader = decord.VideoReader(io.BytesIO(raw[video]))
            indices = video_frame_indices(len(reader), float(reader.get_avg_fps()), self.max_frames)
            frames = np.stack([reader[i].asnumpy() for i in indices])
            out = self.video(videos=[frames], return_tensors="pt")
        return out


def read_raw(root: Path, per_source: int) -> dict[str, list[dict]]:
    """The first `per_source` raw samples of each modality's shards under ROOT/onevision/."""
    raws = {}
    for modality in ONEVISION_MIX:
        got = []
        for shard in sorted(glob.glob(str(root / "onevision" / modality / "*.tar"))):
            for _, raw in tar_samples(shard):
                got.append({**raw, "__source__": modality})
                if len(got) >= per_source:
                    break
            if len(got) >= per_source:
                break
        if not got:
            raise SystemExit(f"--loader {root}: no shards under {root / 'onevision' / modality}")
        raws[modality] = got
    return raws


def _cpu(fn, raw):
    start = time.process_time()
    out = fn(raw)
    return time.process_time() - start, out


def extraction_bench(args, plan: RunPlan, tokenizer, geometry, model_config) -> list[dict]:
    root = Path(args.loader)
    raws = read_raw(root, args.loader_samples)
    template, media = plan.data.samples.template, plan.data.samples.media  # the onevision stage's, as a run's
    paths = {
        "ov_train exact": SampleProcessor(tokenizer, geometry, template, media, 32768),
        "ov_train fast": SampleProcessor(tokenizer, geometry, template, media, 32768, decode="fast"),
        "reference": Reference(geometry),
    }
    if pixels.TORCHVISION:  # `fast` above takes torchvision's decoder and resizes; this one, PIL's alone
        paths["ov_train fast PIL"] = WithoutTorchvision(paths["ov_train fast"])
    flops = ModelFlops.from_config(model_config)
    cpu = {name: {m: [] for m in ONEVISION_MIX} for name in paths}
    tokens, cost = {m: [] for m in ONEVISION_MIX}, {m: [] for m in ONEVISION_MIX}
    diffs = {"images": [], "frames": []}
    torch.set_num_threads(1)  # one loader worker's view: its own thread (decoders size their own)
    for modality, group in raws.items():
        for raw in group:
            outs = {}
            for name, fn in paths.items():  # alternated sample by sample: load changes hit every path alike
                seconds, outs[name] = _cpu(fn, raw)
                cpu[name][modality].append(seconds)
            exact, fast = outs["ov_train exact"], outs["ov_train fast"]
            tokens[modality].append(sum(exact["visual_tokens"]))
            cost[modality].append(flops.train_step(example_counts(exact), set(PARTS)))
            for a, b in zip(exact["images"], fast["images"]):
                diffs["images"].append((a.pixel_values - b.pixel_values).abs().flatten())
            if exact["frames"] is not None:
                diffs["frames"].append((exact["frames"] - fast["frames"]).abs().flatten())
    device = devices.DEVICES[args.device]
    sample_flops = sum(share * np.mean(cost[m]) for m, share in ONEVISION_MIX.items())
    gpu_samples = device.peak_tflops * 1e12 * args.mfu / sample_flops
    visual = sum(share * np.mean(tokens[m]) for m, share in ONEVISION_MIX.items())
    counts = {m: len(g) for m, g in raws.items()}
    print(f"loader CPU cost on {root}: {counts} samples; {args.model} on {device.name} at {args.mfu:.0%} MFU trains "
          f"{gpu_samples:.1f} samples/s of the 31/43/26 mix ({visual:.0f} visual tokens a sample)")
    print(f"{'path':<18}{'single s':>10}{'multi s':>10}{'video s':>10}{'samples/s/core':>16}{'vis tok/s/core':>16}"
          f"{'cores/GPU':>11}{'x1.5':>7}")
    results = []
    for name in paths:
        per = {m: float(np.mean(cpu[name][m])) for m in ONEVISION_MIX}
        seconds = sum(share * per[m] for m, share in ONEVISION_MIX.items())
        cores = gpu_samples * seconds
        print(f"{name:<18}{per['single_image']:>10.3f}{per['multi_image']:>10.3f}{per['video']:>10.3f}"
              f"{1 / seconds:>16.2f}{visual / seconds:>16.0f}{cores:>11.1f}{cores * MARGIN:>7.1f}")
        results.append({"name": f"extraction_{name.replace(' ', '_')}", "cpu_s": per, "cpu_s_per_sample": seconds,
                        "samples_per_s_per_core": 1 / seconds, "visual_tokens_per_s_per_core": visual / seconds,
                        "cores_per_gpu": cores, "cores_per_gpu_with_margin": cores * MARGIN,
                        "device": args.device, "model": args.model, "mfu": args.mfu})
    for what, got in diffs.items():
        if got:
            flat = torch.cat(got)
            print(f"data.decode=fast against exact, {what}: mean |diff| {flat.mean():.4f}, max {flat.max():.3f} "
                  "(normalised pixels, 2 = the full range)")
            name = "decode_fast_pixel_diff" if what == "images" else f"decode_fast_pixel_diff_{what}"
            results.append({"name": name, "mean": float(flat.mean()), "max": float(flat.max())})
    return results
