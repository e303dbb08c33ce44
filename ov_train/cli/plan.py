"""`ov-train plan [OVERRIDE ...] [--json]`: the plan of the configuration training would compose, composed the same
way (run_hydra)."""
from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from ov_train.cli import run_hydra

USAGE = """usage: ov-train plan [--config-dir DIR] [OVERRIDE ...] [--json]

Memory per device and time of one training step of the config training would compose from the same overrides, on
plan.device (default: this machine's GPU). --json prints one JSON object; Hydra's options work as in training."""
# A plan is no run: no run directory, no .hydra/ files, no log file; Hydra leaves logging as it is.
NO_RUN = ["run_dir=null", "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none",
          "hydra/hydra_logging=none"]


def main(argv: list[str] | None = None) -> int:
    """0: planned; 1: Hydra refused the command line (as it does training's); 2: the planner refused the config."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    as_json = "--json" in argv

    def plan(cfg: DictConfig) -> None:
        from ov_train.config.run_plan import ConfigError, resolve_plan
        from ov_train.planner.estimate import PlanError
        from ov_train.planner.report import format_plan, plan_run

        try:  # the run plan training would resolve, less the checks of this machine's files
            planned = plan_run(resolve_plan(cfg, machine=False))
        except (ConfigError, PlanError) as err:
            print(f"ov-train plan: {err}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(planned, indent=2) if as_json else format_plan(planned))

    try:
        # After the user's arguments: Hydra's parser takes its options first, then all the overrides.
        run_hydra(plan, [*(a for a in argv if a != "--json"), *NO_RUN])
    except SystemExit as stop:  # Hydra's refusals end in sys.exit(1), the planner's in 2
        return stop.code if isinstance(stop.code, int) else 1
    return 0
