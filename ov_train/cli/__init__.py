"""Every command of ov_train, from one table: `ov-train [COMMAND] ARGS`. Without a command, `ov-train` trains
(`ov-train stage=onevision`). Commands that take a config (training, `plan`) compose it through Hydra's own command
line (cli/hydra_app.py: overrides, --config-dir, --cfg, -m); the others keep their console scripts too
(`ov-data ...` is `ov-train data ...`).

    ov-train stage=onevision                          # the embedded default, from any directory
    ov-train --config-dir ~/my_conf experiment=mine   # your own config directory, added to the shipped one
    ov-train plan model=ov_qwen2_7b trainer.devices=8 # memory and time of a step, nothing trained
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # ov_train.cli.<module>, whose main(argv) -> exit status runs it
    script: str | None  # its own console script (pyproject.toml), beside `ov-train NAME`
    summary: str


COMMANDS = {
    "train": Command("train", None, "train a stage (the default: `ov-train OVERRIDES`)"),
    "plan": Command("plan", None, "memory and time of one training step per device, nothing trained"),
    "data": Command("data", "ov-data", "convert LLaVA data into shards, inspect them, index parquet files"),
    "export": Command("export", "ov-export", "a Hugging Face directory from any checkpoint ov_train writes"),
    "chat": Command("chat", "ov-chat", "talk to an export"),
    "eval": Command("eval", "ov-eval", "an export's replies to held-out samples, scored"),
    "bench": Command("bench", None, "training and loader throughput (python -m ov_train.bench)"),
}


def main(argv: list[str] | None = None) -> int:
    """`ov-train [COMMAND] ARGS`; ARGS without a command are training's."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        command, args = COMMANDS[args[0]], args[1:]
    else:
        command, args = COMMANDS["train"], (None if argv is None else args)  # training's ranks rerun sys.argv
    status = import_module(f"{__name__}.{command.module}").main(args)
    return status if isinstance(status, int) else 0  # bench returns its results
