"""Held-out accuracy of a trained run with data.decode=exact against fast, on large JPEGs:
python scripts/decode_accuracy.py RUN [--scale 16] [--out DIR].

The embedded synthetic images are PNGs of 32 to 96 px: data.decode=fast never decodes them at a reduced size (PNG
has no DCT scale; a 32 px crop needs every pixel), so a training run with it differs from exact only by its
resizes. This measures what the reduced decode does to a model's answers instead: RUN's held-out shards (the
synthetic data set it trained on) are copied with every image enlarged `--scale` times (bicubic), given mild sensor
noise and saved as a quality-90 JPEG (32 px -> 512 px, 96 px -> 1536 px), and RUN's export is validated on them
twice, by the training run's own validation, with data.decode=exact and with fast. Prints and writes
OUT/decode_accuracy.json: accuracy and loss per decode, overall and per modality.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image


def enlarge(png: bytes, scale: int, rng: np.random.Generator) -> bytes:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    big = image.resize((image.width * scale, image.height * scale), Image.BICUBIC)
    pixels = np.asarray(big, dtype=np.int16) + rng.normal(0, 4, (big.height, big.width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def jpeg_copy(source: Path, out: Path, scale: int) -> int:
    """The synthetic data set at `source` copied to `out`, its held-out images enlarged to JPEGs; returns how many."""
    shutil.copytree(source, out)
    rng, count = np.random.default_rng(0), 0
    for shard in sorted(out.glob("*/val-*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name.endswith(".png"):
                    data, member.name = enlarge(data, scale, rng), member.name[: -len(".png")] + ".jpg"
                    count += 1
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return count


def pixel_difference(root: Path, export: Path) -> dict:
    """Mean and max |exact - fast| over the held-out images' crops (normalised pixels; 2 = the full range), each cut
    as the onevision stage cuts it: anyres alone, a padded crop among several."""
    from transformers import AutoConfig

    from ov_train.data.sources import tar_samples
    from ov_train.vision.geometry import VisionGeometry
    from ov_train.vision.preprocess import open_image, preprocess_image

    geometry = VisionGeometry.from_model_config(AutoConfig.from_pretrained(export))
    diffs = []
    for shard in sorted(root.glob("*/val-*.tar")):
        for _, raw in tar_samples(str(shard)):
            images = [raw[k] for k in sorted(raw) if k.endswith(".jpg")]
            mode = "anyres" if len(images) == 1 else "pad"
            for data in images:
                crops = []
                for fast in (False, True):
                    image, size = open_image(data, geometry, mode, fast=fast)
                    crops.append(preprocess_image(image, geometry, mode=mode, size=size).pixel_values)
                diffs.append((crops[0] - crops[1]).abs().flatten())
    flat = torch.cat(diffs)
    return {"mean": float(flat.mean()), "max": float(flat.max())}


def validate(run: Path, root: Path, decode: str, run_dir: Path) -> dict:
    """RUN's export validated on `root` by the training module's own validation step."""
    from ov_train.checkpoints.adapters import build_for_training
    from ov_train.config.compose import compose
    from ov_train.config.run_plan import resolve_plan
    from ov_train.constants import PARTS
    from ov_train.data.compute_batches import SampleCost
    from ov_train.data.prepare import prepare_data
    from ov_train.run import build_trainer, check
    from ov_train.training.datamodule import OneVisionData
    from ov_train.training.module import OneVisionModule
    from ov_train.vision.geometry import VisionGeometry
    from ov_train.vision.settings import apply_to_model_config

    trained = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    overrides = [o for o in trained if not o.startswith(("hydra.", "data.decode=", "logger="))]
    cfg = compose([*overrides, f"model.init_from={run / 'export'}", f"data.root={root}", f"data.decode={decode}",
                   "logger=csv", "trainer.enable_progress_bar=false"], run_dir)
    plan, source, located = check(resolve_plan(cfg))
    torch.set_num_threads(plan.cpus.threads)
    recipe = prepare_data(plan.data, located)
    model, tokenizer, adapter = build_for_training(plan, source)
    apply_to_model_config(model.config, plan.data.samples.media, plan.data.samples.placement)
    data = OneVisionData(plan.data, recipe, tokenizer, VisionGeometry.from_model_config(model.config),
                         SampleCost.of_model(model.config, set(PARTS)))
    tokenizer.save_pretrained(plan.paths.tokenizer)
    module = OneVisionModule(model, plan.optim, forward_options=plan.forward, tokenizer_dir=str(plan.paths.tokenizer),
                             nonfinite=plan.nonfinite, identity=plan.identity, template=plan.data.samples.template,
                             adapter=adapter, seed=plan.seed)
    build_trainer(plan).validate(module, datamodule=data, verbose=False)
    return dict(module.val_metrics)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished run directory on the embedded synthetic data (RUN/export)")
    p.add_argument("--scale", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="default: RUN/decode_accuracy")
    args = p.parse_args()
    out = args.out or args.run / "decode_accuracy"
    config = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    from ov_train.data.synthetic import synthetic_root

    source = synthetic_root(config.data.root, **OmegaConf.to_container(config.data.synthetic), seed=config.seed)
    root = out / "jpeg_data"
    images = jpeg_copy(source, root, args.scale) if not root.exists() else None
    results = {"run": str(args.run), "scale": args.scale, "images": images,
               "pixel_difference": pixel_difference(root, args.run / "export")}
    print("pixels, fast against exact:", json.dumps(results["pixel_difference"]))
    for decode in ("exact", "fast"):
        results[decode] = validate(args.run, root, decode, out / decode)
        print(decode, json.dumps(results[decode]))
    (out / "decode_accuracy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
