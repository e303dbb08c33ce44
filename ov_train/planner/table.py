"""The planner's table for docs/PERFORMANCE.md: OV-0.5B / 7B / 72B x full or LoRA x DDP / ZeRO-2 / ZeRO-3 / FSDP2
x steps of 8k / 32k tokens x 8 / 64 GPUs, on 80 GB (H100) and 141 GB (H200) devices.

    python -m ov_train.planner.table            # markdown on stdout; traces cached under the cache dir

Each model keeps its config's activation checkpointing; the step is one packed row of the OneVision mix
(model.max_tokens = plan.tokens); precision is what training picks on several GPUs (bf16-mixed). One trace
per model, row size and compute dtype serves every engine and GPU count: activations do not depend on them.
"""
from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from ov_train.config.compose import compose
from ov_train.config.run_plan import resolve_plan
from ov_train.devices import DEVICES
from ov_train.planner.estimate import Setup, plan_setup

MODELS = {"ov_qwen2_0_5b": "OV-0.5B", "ov_qwen2_7b": "OV-7B", "ov_qwen2_72b": "OV-72B"}
STRATEGIES = {"ddp": "DDP", "deepspeed_zero2": "ZeRO-2", "deepspeed_zero3": "ZeRO-3", "fsdp2": "FSDP2"}
TOKENS = (8192, 32768)
GPUS = (8, 64)
KINDS = ("h100", "h200")


def plan_cell(model: str, lora: bool, strategy: str, tokens: int, gpus: int) -> dict:
    nodes = gpus // 8
    cfg = compose([
        f"model={model}", f"strategy={strategy}", "trainer.devices=8", f"trainer.num_nodes={nodes}",
        f"plan.tokens={tokens}", f"model.max_tokens={tokens}", f"adapter={'lora' if lora else 'none'}", "plan.device=h100",
    ])
    return plan_setup(Setup.of(resolve_plan(cfg, machine=False)))


def _mark(peak: float, kind: str) -> str:
    usable = DEVICES[kind].memory_gib - 2.0
    return "✓" if peak <= usable else "✗"


def build() -> tuple[str, list[dict]]:
    cells = [(m, lora, s, t, g) for m in MODELS for lora in (False, True) for s in STRATEGIES for t in TOKENS for g in GPUS]
    plans = {}
    for cell in tqdm(cells, desc="planning", unit="config"):
        plans[cell] = plan_cell(*cell)
    header = "| model | train | engine | " + " | ".join(f"{t // 1024}k, {g} GPUs" for t in TOKENS for g in GPUS) + " |"
    lines = [header, "|" + "---|" * (3 + len(TOKENS) * len(GPUS))]
    for m in MODELS:
        for lora in (False, True):
            for s in STRATEGIES:
                row = [MODELS[m], "LoRA r16" if lora else "full", STRATEGIES[s]]
                for t in TOKENS:
                    for g in GPUS:
                        peak = plans[(m, lora, s, t, g)]["peak_gib"]
                        row.append(f"{peak:.1f} {''.join(_mark(peak, k) for k in KINDS)}")
                lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| model | train | " + " | ".join(f"{t // 1024}k tokens: step s (tokens/s per GPU)" for t in TOKENS) + " |",
              "|---|---|" + "---|" * len(TOKENS)]
    for m in MODELS:
        for lora in (False, True):
            row = [MODELS[m], "LoRA r16" if lora else "full"]
            for t in TOKENS:
                p = plans[(m, lora, "fsdp2", t, 8)]
                row.append(f"{p['step_time_s']:.2f} ({p['tokens_per_s']:,})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), [dict(cell=list(k), **v) for k, v in plans.items()]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m ov_train.planner.table", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="also write every cell's plan to this JSON file")
    args = p.parse_args(argv)
    start = time.time()
    table, plans = build()
    print(table)
    print(f"\n({len(plans)} configurations planned in {time.time() - start:.0f} s)")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(plans, indent=1))
    return table


if __name__ == "__main__":
    main()
