"""`ov-train plan [hydra overrides] [--json]`: the plan of the configuration training would compose."""
from __future__ import annotations

import json
import sys

from ov_train.config.compose import compose

USAGE = """usage: ov-train plan [OVERRIDE ...] [--json]

Plans one training step of the composed configuration (the same overrides as training: model=, stage=,
strategy=, trainer.devices=, ...) on plan.device (h100, h200, a100_80g, a100_40g, l40s, b200, cpu; default:
this machine's GPU): memory per device (weights, gradients, optimizer state, activations, the loss's working
set, peak) and the step time at plan.mfu. --json prints one JSON object."""


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    as_json = "--json" in argv
    overrides = [a for a in argv if a != "--json"]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        print(f"ov-train plan: unknown option(s) {unknown}\n{USAGE}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ov_train.planner.estimate import PlanError
    from ov_train.planner.report import format_plan, plan_config

    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:  # a typo or a missing option, as training names it
        cause = f"\n{err.__cause__}" if err.__cause__ else ""
        print(f"ov-train plan: {err}{cause}", file=sys.stderr)
        return 2
    try:
        plan = plan_config(cfg)
    except PlanError as err:
        print(f"ov-train plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if as_json else format_plan(plan))
    return 0
