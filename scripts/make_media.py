"""Write the loader benchmark's realistic media as onevision shards: python scripts/make_media.py DIR [--small].

Default (the issue's measurement): 150 JPEGs (photos 640x480 to 4000x3000, 10% A4 scans at 2480x3508) and 12 H.264
clips, 1280x720, 30 fps, 30 s, a key frame every 250 frames; then `python -m ov_train.bench --loader DIR`.
--small: 20 images and 2 clips of 10 s (a quick look).
"""
import argparse
import json
from pathlib import Path

from ov_train.bench.media import write_media_shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--small", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = {"photos": 20, "clips": 2, "clip_seconds": 10.0} if args.small else {}
    print(json.dumps(write_media_shards(args.root, seed=args.seed, **sizes)))


if __name__ == "__main__":
    main()
