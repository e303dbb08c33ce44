"""The devices the planner knows: memory and dense bf16 peak per kind, in one table.

Memory is what torch reports as the device's total (`torch.cuda.get_device_properties().total_memory`),
a little under the nominal figure; on a GPU machine the planner reads the real figure instead. Peaks are
the datasheets' dense (no sparsity) bf16 TFLOP/s, the MFU denominator (`metrics.peak_tflops`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Device:
    kind: str
    name: str
    memory_gib: float
    peak_tflops: float | None  # None: unknown (the CPU), no step time


DEVICES = {
    "h100": Device("h100", "NVIDIA H100 80GB (SXM)", 79.1, 989.0),
    "h100_pcie": Device("h100_pcie", "NVIDIA H100 80GB PCIe", 79.1, 756.0),
    "h200": Device("h200", "NVIDIA H200 141GB", 139.8, 989.0),
    "b200": Device("b200", "NVIDIA B200 180GB", 178.4, 2250.0),
    "a100_80g": Device("a100_80g", "NVIDIA A100 80GB", 79.2, 312.0),
    "a100_40g": Device("a100_40g", "NVIDIA A100 40GB", 39.4, 312.0),
    "l40s": Device("l40s", "NVIDIA L40S 48GB", 44.4, 362.0),
}
# Substrings of torch.cuda.get_device_name(), most specific first.
_NAMES = (("H200", "h200"), ("H100 PCIe", "h100_pcie"), ("H100", "h100"), ("B200", "b200"), ("A100", None), ("L40S", "l40s"))


class DeviceError(ValueError):
    pass


def host_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def kind_of(name: str, memory_gib: float) -> str | None:
    for fragment, kind in _NAMES:
        if fragment in name:
            return kind or ("a100_80g" if memory_gib > 60 else "a100_40g")
    return None


def resolve(kind: str | None, accelerator: str = "auto", memory_gib: float | None = None) -> Device:
    """The device a plan is for: `kind` from DEVICES or `cpu`, or (None) this machine's GPU, or its CPU when the
    trainer runs there; `memory_gib` replaces the table's memory."""
    if kind is None:
        if accelerator != "cpu" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            real = props.total_memory / 2**30
            found = kind_of(props.name, real)
            known = DEVICES.get(found)
            device = Device(found or "gpu", props.name, real, known.peak_tflops if known else None)
        elif accelerator == "cpu":
            device = Device("cpu", "host CPU", host_memory_gib(), None)
        else:
            raise DeviceError(
                f"plan.device=null: no GPU to detect on this machine; name the device, one of {sorted(DEVICES)} or cpu"
            )
    elif kind == "cpu":
        device = Device("cpu", "host CPU", host_memory_gib(), None)
    elif kind in DEVICES:
        device = DEVICES[kind]
    else:
        raise DeviceError(f"plan.device={kind!r}; allowed: {sorted(DEVICES)}, cpu, or null (detect this machine's GPU)")
    if memory_gib is not None:
        device = Device(device.kind, device.name, float(memory_gib), device.peak_tflops)
    return device
