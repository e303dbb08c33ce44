"""The `ov-data` command: `convert` LLaVA data into ov_train training shards, `inspect` the result, `index`
parquet files that recipes train on directly."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ov_train.config.reproduce import REPRODUCE
from ov_train.constants import PARQUET
from ov_train.data.convert import convert
from ov_train.data.formats import FORMATS, InputError
from ov_train.data.frame_extraction import FrameExtraction
from ov_train.data.inspect import format_report, inspect_dir
from ov_train.data.remote import redact, redact_text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _holdout(text: str) -> int | float:
    """--holdout: a count of items (an integer >= 1) or a fraction of the input (0 < f < 1)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"must be a count (>= 1) or a fraction between 0 and 1, got {text}") from None
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a count (>= 1) or a fraction between 0 and 1, got {text}")
    return value


def _frames(text: str) -> FrameExtraction:
    try:
        return FrameExtraction.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _convert(args: argparse.Namespace) -> int:
    try:
        totals = convert(args.input, args.out, args.media_root, args.format, args.samples_per_shard,
                         args.max_shard_bytes, args.workers, args.seed, args.tokenizer, args.allow_outside_root,
                         args.holdout, reproduce=args.reproduce, video_frames=args.video_frames)
    except InputError as err:
        print(f"ov-data convert: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ov-data convert: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(f"{redact(args.out)}: {totals['chunks']} chunk(s), {totals['resumed_chunks']} already done by an earlier run; "
          "wrote index.json and rejects.jsonl")
    print(format_report(totals))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    try:
        stats = inspect_dir(args.dir)
    except (OSError, ValueError) as err:
        print(f"ov-data inspect: error: {redact_text(err)}", file=sys.stderr)
        return 1
    except KeyError as err:
        print(f"ov-data inspect: error: {redact(args.dir)}: index.json or rejects.jsonl lacks {err}", file=sys.stderr)
        return 1
    print(json.dumps(stats) if args.json else f"{stats['dir']}: " + format_report(stats))
    return 0


def _index(args: argparse.Namespace) -> int:
    from ov_train.data.convert import _load_tokenizer
    from ov_train.data.parquet_source import ParquetIndexError, build_index, default_index_location, write_index
    from ov_train.data.recipe import locations

    try:
        files, problem = locations(args.source, "", PARQUET, check=True)
        if problem:
            raise ParquetIndexError(problem)
        out = args.out or default_index_location(files)
        index = build_index(files, _load_tokenizer(args.tokenizer))
        write_index(index, out)
    except (InputError, ParquetIndexError, OSError) as err:
        print(f"ov-data index: error: {redact_text(err)}", file=sys.stderr)
        return 1
    print(f"{redact(out)}: index of {len(files)} parquet file(s); a recipe source with this path and format: parquet"
          " finds it beside the files (or name it with index:)")
    print(format_report({**index["totals"], "shards": len(files)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ov-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    summary = ("LLaVA data (JSON, JSONL, data YAML, parquet; conversations or preference pairs) -> WebDataset shards, "
               "index.json, rejects.jsonl")
    cmd = commands.add_parser("convert", help=summary, description=summary)
    cmd.add_argument("input", help="LLaVA .json / .jsonl, LLaVA-NeXT data .yaml, or .parquet with image bytes; records "
                                   "with chosen/rejected replies (LLaVA-NeXT's DPO JSON, Hugging Face's preference "
                                   "layout) become preference pairs")
    cmd.add_argument("--out", required=True, help="output folder for shards, index.json and rejects.jsonl; or a "
                                                  "remote location (s3://...) they are uploaded to whole when done")
    cmd.add_argument("--media-root", help="folder the image/video paths are relative to (default: INPUT's folder); "
                                          "paths resolving outside it are rejected as outside_media_root")
    cmd.add_argument("--allow-outside-root", action="store_true",
                     help="read media paths that resolve outside --media-root (.., absolute paths, symlinks)")
    cmd.add_argument("--format", choices=sorted(set(FORMATS.values())), help="override the format the extension implies")
    cmd.add_argument("--samples-per-shard", type=_positive, default=1000)
    cmd.add_argument("--max-shard-bytes", type=_positive, default=1 << 30)
    cmd.add_argument("--workers", type=_positive, default=os.cpu_count() or 1, help="parallel processes (default: all cores)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of random:N%% sampling in a data YAML")
    cmd.add_argument("--tokenizer", help="tokenizer folder for text token counts (default: the tiny built-in one)")
    cmd.add_argument("--holdout", type=_holdout, help="also write a held-out split (val-*.tar) of N items or a "
                                                      "FRACTION of the input, drawn with --seed")
    cmd.add_argument("--reproduce", choices=REPRODUCE, default="ov_train",
                     help="count the index's visual tokens as training with stage.reproduce=this does (public_code: "
                          "the public code's truncating anyres unpadding)")
    cmd.add_argument("--video-frames", type=_frames, metavar="fps=1,max=32,size=384",
                     help="store each video as its sampled frames (JPEG, size x size) instead of the file: decoded once"
                          " here rather than every epoch (data/frame_extraction.py)")
    cmd.set_defaults(run=_convert)

    summary = "samples per modality, token totals and percentiles, rejects by reason of a converted folder"
    cmd = commands.add_parser("inspect", help=summary, description=summary)
    cmd.add_argument("dir", help="an `ov-data convert` output folder or an `ov-data index` file, local or remote")
    cmd.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cmd.set_defaults(run=_inspect)

    summary = "index parquet files (released OneVision layout) for training on them directly: convert's checks and counts"
    cmd = commands.add_parser("index", help=summary, description=summary)
    cmd.add_argument("source", help="parquet file(s): a file, glob, brace pattern or folder, local or remote")
    cmd.add_argument("--out", help="where the index goes (default: index.json beside the files)")
    cmd.add_argument("--tokenizer", help="tokenizer folder for text token counts (default: the tiny built-in one)")
    cmd.set_defaults(run=_index)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")  # warnings (a restarted conversion) reach stderr as plain lines
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
