"""Every command of ov_train, from one table: `ov-train [COMMAND] ARGS`; without a command, ov-train trains.
Training and `plan` compose their config one way, through Hydra's own command line (run_hydra); the other commands
keep their console scripts too (`ov-data ...` is `ov-train data ...`)."""
from __future__ import annotations

import sys
from collections.abc import Callable
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


def run_hydra(task: Callable, argv: list[str] | None = None) -> None:
    """`task(cfg)` on the config Hydra composes from `argv` (overrides, --config-dir, --cfg, -m), which stands in for
    sys.argv[1:] meanwhile; None for a run that starts ranks: Lightning starts them with this process's sys.argv."""
    import hydra  # here: commands without a config stay quick

    from ov_train.config import schema  # noqa: F401  (registers the schema Hydra composes onto)
    from ov_train.resources import CONF_DIR

    saved = sys.argv
    sys.argv = saved if argv is None else [saved[0], *argv]
    started = []

    def started_task(cfg):
        started.append(True)
        return task(cfg)

    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(started_task)()
    except SystemExit as stop:
        if stop.code and not started:  # composition failed: Hydra has said why; add the keys a typo may have meant
            from ov_train.config.key_hints import unknown_key_hint

            hint = unknown_key_hint(sys.argv[1:])
            if hint:
                print(hint, file=sys.stderr)
        raise
    finally:
        sys.argv = saved
