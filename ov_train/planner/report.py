"""The plan as text, and the preflight that runs it before training."""
from __future__ import annotations

import torch

from ov_train.planner.estimate import PlanError, Setup, plan_setup, suggestions
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
        f"step per device: {plan['tokens']:,} tokens ({plan['tokens_from']}): {samples}; {plan['crops_and_frames']} "
        f"crops and frames; {plan['rows']} row(s) of up to {plan['row_tokens']:,} tokens",
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
    for s in plan.get("suggestions", []):
        lines.append(f"would fit: {s['change']} -> peak {s['peak_gib']:.2f} GiB" if s["fits"]
                     else f"not enough alone: {s['change']} -> peak {s['peak_gib']:.2f} GiB")
    return "\n".join(lines)


def plan_config(cfg, suggest: bool = True) -> dict:
    """The plan of a composed config; with `suggest`, a configuration that does not fit gets the changes that
    would make it fit, each planned."""
    setup = Setup.from_config(cfg)
    plan = plan_setup(setup)
    if suggest and not plan["fits"]:
        plan["suggestions"] = suggestions(setup)
    return plan


def preflight(cfg) -> dict | None:
    """Before training: plan the run when it trains on GPUs, or whenever plan.device names a device. A peak over
    the device's usable memory stops the run (PlanError) with the numbers and what would fit, unless
    plan.enforce=false, which only warns."""
    plan_cfg = cfg.get("plan")
    on_gpu = cfg.trainer.accelerator != "cpu" and torch.cuda.is_available()
    if plan_cfg is None or not (on_gpu or plan_cfg.get("device")):
        return None
    plan = plan_config(cfg)
    text = format_plan(plan)
    if plan["fits"]:
        log.info("memory plan:\n%s", text)
        return plan
    message = (f"the planned peak of {plan['peak_gib']:.2f} GiB per device exceeds the {plan['usable_gib']:.2f} GiB usable on "
               f"{plan['device']} (plan.device; plan.reserve_gib={cfg.plan.get('reserve_gib')} kept free):\n{text}")
    if plan_cfg.get("enforce", True):
        raise PlanError(message + "\nplan.enforce=false trains anyway")
    log.warning("%s\nplan.enforce=false: training anyway", message)
    return plan
