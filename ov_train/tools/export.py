"""`ov-export CKPT OUT`: a Hugging Face directory from any checkpoint ov_train writes (ov_train/model/checkpoint_io.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ov_train.constants import TEMPLATES
from ov_train.model.checkpoint_io import checkpoint_metadata, export_pretrained, model_from_checkpoint
from ov_train.model.model_card import card_facts
from ov_train.text.tokenizer import load_tokenizer
from ov_train.utils.safe_load import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ov-export", description=__doc__)
    parser.add_argument(
        "ckpt", help="a checkpoint written by ov_train (RUN/checkpoints/last.ckpt: a file, or a DeepSpeed / FSDP2 directory)"
    )
    parser.add_argument("out", help="output directory for the Hugging Face export")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle the checkpoint fully, objects of any class included (that can run code: only for files you trust)",
    )
    parser.add_argument(
        "--template", choices=TEMPLATES,
        help="the chat template the model was trained with (default: the one recorded in the checkpoint, else qwen_1_5)",
    )
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"checkpoint not found: {args.ckpt}")
    try:
        model, tokenizer_dir = model_from_checkpoint(args.ckpt, trust=args.trust_checkpoint)
    except (CheckpointError, OSError) as err:
        parser.error(str(err))
    tokenizer_dir = args.tokenizer or tokenizer_dir
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        parser.error(f"tokenizer directory not found: {tokenizer_dir!r}; pass --tokenizer DIR")
    facts = card_facts(checkpoint_metadata(args.ckpt, trust=args.trust_checkpoint))
    template = args.template or facts["template"] or "qwen_1_5"
    export_pretrained(model, load_tokenizer(tokenizer_dir), args.out, template=template, card=facts)
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
