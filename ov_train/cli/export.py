"""`ov-export CKPT OUT`: a Hugging Face directory from any checkpoint ov_train writes (ov_train/checkpoints/);
an adapter checkpoint merged into its base, with its adapters in PEFT's format in OUT/adapter/
(ov_train/checkpoints/adapters.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ov_train.checkpoints.export import export_checkpoint
from ov_train.checkpoints.safe_load import CheckpointError
from ov_train.constants import TEMPLATES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ov-export", description=__doc__)
    parser.add_argument(
        "ckpt", help="a checkpoint written by ov_train (RUN/checkpoints/last.ckpt: a file, or a DeepSpeed / FSDP2 directory)"
    )
    parser.add_argument("out", help="output directory for the Hugging Face export")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint; with"
                        " --base, it also builds the base)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle the checkpoint fully, objects of any class included (that can run code: only for files you trust)",
    )
    parser.add_argument(
        "--template", choices=TEMPLATES,
        help="the chat template the model was trained with (default: the one recorded in the checkpoint, else qwen_1_5)",
    )
    parser.add_argument("--adapter-only", action="store_true",
                        help="an adapter checkpoint: write only its adapters, in PEFT's format (PeftModel.from_pretrained)")
    parser.add_argument("--base", help="an adapter checkpoint's base model, a Hugging Face directory (default: rebuilt"
                        " from what the checkpoint records: model.pretrained, ..., or the seed of a random init)")
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"checkpoint not found: {args.ckpt}")
    if args.base and not Path(args.base).is_dir():
        parser.error(f"--base {args.base}: not a directory")
    if args.tokenizer and not Path(args.tokenizer).exists():
        parser.error(f"tokenizer directory not found: {args.tokenizer!r}")
    try:
        export_checkpoint(args.ckpt, args.out, args.tokenizer, args.trust_checkpoint, args.base, args.adapter_only,
                          args.template)
    except (CheckpointError, OSError) as err:
        parser.error(str(err))
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
