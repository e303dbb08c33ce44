"""ov-eval EXPORT DATA: greedy replies of an export to held-out samples, scored per source and per modality.

Writes predictions.jsonl (id, prompt, reference, prediction, correct, ...) and metrics.json. A rerun skips the
samples already in predictions.jsonl.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ov_train.data.synthetic import synthetic_root
from ov_train.eval.evaluate import claim_out_dir, eval_sources, evaluate, generation_record
from ov_train.eval.inference import ExportError, check_export, load_export
from ov_train.eval.metrics import METRICS
from ov_train.utils.locations import is_pipe
from ov_train.utils.redact import redact_text


def device_and_dtype(device: str) -> tuple[str, torch.dtype]:
    """`auto`: the GPU when there is one. Weights in bf16 on GPU, fp32 on CPU (where bf16 is slow)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def default_root(export: str | Path) -> str | Path | None:
    """Where a recipe's sources start when --root is not given: the data the run that wrote `export` read (its
    .hydra/config.yaml beside the export: data.root, or its synthetic data set, one cache directory per setting),
    else the default run's synthetic data set. A run directory is not the user's word: a `pipe:` data.root in it
    (a shell command) is refused, naming the file."""
    run_config = Path(os.path.abspath(export)).parent / ".hydra" / "config.yaml"  # a symlinked export: its run
    if run_config.is_file():
        cfg = OmegaConf.load(run_config)
    else:
        from ov_train.config.compose import compose

        cfg = compose([])
    data = cfg.data
    root = data.get("root")
    if root is not None and is_pipe(str(root)):  # with synthetic data too: their recipe's paths are joined onto it
        raise ValueError(f"{run_config}: data.root={redact_text(root)!r} is a shell command (pipe:); ov-eval runs no"
                         " command from a run directory: give --root (typed by you, it may be a pipe:)")
    if data.get("synthetic") is None:
        return None if root is None else str(root)
    return synthetic_root(root, **OmegaConf.to_container(data.synthetic), seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ov-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a Hugging Face export (RUN/export, or ov-export's output)")
    parser.add_argument(
        "data", help="an ov-data shard directory (its val-*.tar, else all its shards), or a recipe"
        " (a name in data_recipes/ or a .yaml path): its sources' held-out val-*.tar shards",
    )
    parser.add_argument("--out", help="output directory (default: eval/<DATA name> beside the export)")
    parser.add_argument("--max-samples", type=int, help="at most this many samples per source")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit (default 128)")
    parser.add_argument("--max-frames", type=int, help="most video frames (default: the export's stage's, ov_train_media)")
    parser.add_argument(
        "--metric", choices=sorted(METRICS),
        help="score every source with this metric (default: each recipe source's `metric:`, else exact_match)",
    )
    parser.add_argument(
        "--root", help="where a recipe's relative source paths start (default: the data of the run that wrote"
        " EXPORT, from RUN/.hydra/config.yaml, else the default run's synthetic shards)",
    )
    parser.add_argument(
        "--allow-pipe", action="store_true",
        help="run the recipe's pipe: paths (shell commands; refused by default, since a recipe may come from anyone)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    args = parser.parse_args(argv)
    for name in ("max_samples", "batch_size", "max_new_tokens", "max_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: must be a positive integer")
    # Every input is checked before the model loads.
    try:
        check_export(args.export)
        root = args.root if args.root is not None else default_root(args.export)
        sources = eval_sources(args.data, root, args.metric, args.allow_pipe)
        out = Path(args.out) if args.out else Path(args.export).resolve().parent / "eval" / Path(args.data).stem
        claim_out_dir(out, generation_record(args.export, args.max_new_tokens, args.max_frames))
    except (ExportError, ValueError) as err:
        parser.error(str(err))
    device, dtype = device_and_dtype(args.device)
    try:  # the export's chat template too: refused before the model loads, or at the sample it runs over on
        processor, prompts, model = load_export(args.export, "ov-eval", device, dtype)
        metrics = evaluate(
            processor, prompts, model, sources, out, max_samples=args.max_samples, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, max_frames=args.max_frames,
        )
    except ExportError as err:
        parser.error(str(err))
    print(f"{'source':<24} {'metric':<18} {'samples':>8} {'score':>8} {'exact':>8}")
    for name, m in metrics["by_source"].items():
        print(f"{name:<24} {str(m['metric']):<18} {m['samples']:>8} {m['score']:>8.4f} {m['exact_match']:>8.4f}")
    print(f"{'all':<24} {'':<18} {metrics['samples']:>8} {metrics['score']:>8.4f} {metrics['exact_match']:>8.4f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
