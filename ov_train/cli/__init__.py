"""Every command of ov_train, from one table: `ov-train [COMMAND] ARGS`; without a command, ov-train trains.
Training and `plan` compose their config through Hydra's own command line (cli/hydra_app.py); the other commands
keep their console scripts too (`ov-data ...` is `ov-train data ...`)."""
from __future__ import annotations

import sys
from importlib import import_module

# Every command: ov_train.cli.<name>, whose main(argv) returns the exit status; and its own console script, if any.
COMMANDS = {"train": None, "plan": None, "data": "ov-data", "export": "ov-export", "chat": "ov-chat", "eval": "ov-eval",
            "bench": None}


def main(argv: list[str] | None = None) -> int:
    """`ov-train [COMMAND] ARGS`; ARGS without a command are training's."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        name, args = args[0], args[1:]
    else:
        name, args = "train", (None if argv is None else args)  # training's ranks rerun this process's sys.argv
    status = import_module(f"{__name__}.{name}").main(args)
    return status if isinstance(status, int) else 0  # bench returns its results
