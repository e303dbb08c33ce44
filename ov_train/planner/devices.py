"""The device a plan is for: one of the table's kinds (ov_train/devices.py, which the MFU metric reads too), this
machine's GPU (its real memory), or the host CPU."""
from __future__ import annotations

from pathlib import Path

import torch

from ov_train.devices import DEVICES, Device, kind_of


class DeviceError(ValueError):
    pass


def host_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


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
