"""The plan as text, and the preflight that runs it before training."""
from __future__ import annotations

import torch

from ov_train.config.run_plan import RunPlan
from ov_train.planner.estimate import PlanError, Setup, plan_setup, sequence_parallel_search, suggestions
from ov_train.utils.logging import get_logger

log = get_logger(__name__)

ROWS = (
    ("weights", "weights_gib"),
    ("gradients", "gradients_gib"),
    ("fp32 masters", "masters_gib"),
    ("AdamW moments", "optimizer_gib"),
    ("buffers (buckets, gathered weights)", "buffers_gib"),
    ("activations (peak)", "activations_gib"),
    ("  of which the loss's working set", "loss_gib"),
    ("optimizer step working set", "optimizer_step_gib"),
)


def format_plan(plan: dict) -> str:
    samples = ", ".join(f"{n} {m}" for m, n in plan.get("samples", {}).items() if n)
    adapter = plan.get("adapter")
    lora = f", adapter={adapter['kind']} r={adapter['r']}" if adapter else ""
    lines = [
        f"plan: {plan['model']} ({plan['parameters'] / 1e9:.2f}B parameters, {plan['trainable_parameters'] / 1e9:.2f}B "
        f"trained{lora}), {plan['path']} path, {plan['strategy']} on {plan['devices']} x {plan['device']} "
        f"({plan['device_name']}), {plan['precision']}",
        _step_line(plan, samples),
        f"kernels: attention {plan['attention']}, loss {plan['loss_kernel']}, activation checkpointing "
        f"{'+'.join(plan['activation_checkpointing']) or 'none'}",
        f"{'per device':<38}{'GiB':>9}",
    ]
    lines += [f"  {label:<36}{plan[key]:>9.2f}" for label, key in ROWS]
    if plan["host_gib"]:
        lines.append(f"  {'offloaded to host memory':<36}{plan['host_gib']:>9.2f}")
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"  {'peak':<36}{plan['peak_gib']:>9.2f}   (forward/backward {plan['forward_backward_peak_gib']:.2f}, "
                 f"optimizer step {plan['optimizer_step_peak_gib']:.2f})")
    lines.append(f"  {'device':<36}{plan['device_gib']:>9.2f}   ({plan['usable_gib']:.2f} usable): {verdict}")
    if plan["step_time_s"] is not None:
        lines.append(
            f"model FLOPs per step per device {plan['flops_per_step']:.3g}; at {100 * plan['mfu']:.0f}% MFU of "
            f"{plan['peak_tflops']:g} TFLOP/s: {plan['step_time_s']:.2f} s per step, {plan['tokens_per_s']:,} tokens/s per device"
        )
    else:
        lines.append(f"model FLOPs per step per device {plan['flops_per_step']:.3g} (no peak TFLOP/s for {plan['device']})")
    lines += [f"note: {n}" for n in plan["notes"]]
    search = plan.get("sequence_parallel_search")
    if search:
        tried = ", ".join(f"{s['degree']} -> {s['peak_gib']:.2f} GiB" for s in search)
        needed = search[-1]
        verdict = (f"a step needs strategy.sequence_parallel={needed['degree']}" if needed["fits"]
                   else "no degree the heads and devices allow fits")
        lines.append(f"sequence parallel degrees on {plan['devices']} x {plan['device']} (peak per device): {tried}:"
                     f" {verdict}")
    for s in plan.get("suggestions", []):
        lines.append(f"would fit: {s['change']} -> peak {s['peak_gib']:.2f} GiB" if s["fits"]
                     else f"not enough alone: {s['change']} -> peak {s['peak_gib']:.2f} GiB")
    return "\n".join(lines)


def _step_line(plan: dict, samples: str) -> str:
    video = (f"; videos of up to {plan['max_frames']} frames pooled by {plan['video_pool']}, newlines"
             f" {plan['video_newline']}") if "video" in samples else ""
    sp = plan.get("sequence_parallel", 1)
    where = (f"per sequence-parallel group of {sp} devices ({plan['data_parallel']} groups; each device holds 1/{sp}"
             " of the row and encodes 1/{sp} of the frames)".replace("{sp}", str(sp)) if sp > 1 else "per device")
    return (f"step {where}: {plan['tokens']:,} tokens ({plan['tokens_from']}): {samples}{video}; "
            f"{plan['crops_and_frames']} crops and frames; traced per device: {plan['rows']} row(s) of up to"
            f" {plan['row_tokens']:,} tokens")


def plan_run(run: RunPlan, suggest: bool = True) -> dict:
    """The plan of a run plan on the device its `plan` settings name; with `suggest`, a configuration that does not
    fit gets the changes that would make it fit, each planned. Under sequence parallelism (or when a step of video
    does not fit on several devices) every degree the heads and devices allow is planned up to the first that fits."""
    setup = Setup.of(run)
    plan = plan_setup(setup)
    video = setup.shares.get("video", 0) > 0
    if setup.engine.sequence_parallel > 1 or (suggest and video and not plan["fits"] and setup.engine.world > 1):
        plan["sequence_parallel_search"] = sequence_parallel_search(setup)
    if suggest and not plan["fits"]:
        plan["suggestions"] = suggestions(setup)
    return plan


def preflight(run: RunPlan) -> dict | None:
    """Before training: plan the run when it trains on GPUs, or whenever plan.device names a device. A peak over the
    device's usable memory stops the run (PlanError) with the numbers and what would fit, unless plan.enforce=false,
    which only warns."""
    settings = run.planner
    on_gpu = run.trainer["accelerator"] != "cpu" and torch.cuda.is_available()
    if not (on_gpu or settings.get("device")):
        return None
    plan = plan_run(run)
    text = format_plan(plan)
    if plan["fits"]:
        log.info("memory plan:\n%s", text)
        return plan
    message = (f"the planned peak of {plan['peak_gib']:.2f} GiB per device exceeds the {plan['usable_gib']:.2f} GiB usable on "
               f"{plan['device']} (plan.device; plan.reserve_gib={settings.get('reserve_gib')} kept free):\n{text}")
    if settings["enforce"]:
        raise PlanError(message + "\nplan.enforce=false trains anyway")
    log.warning("%s\nplan.enforce=false: training anyway", message)
    return plan
