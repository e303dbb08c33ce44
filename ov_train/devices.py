"""Accelerator kinds: memory and dense bf16 peak, in one table read by the MFU metric and the planner.

Memory is what torch reports as a device's total (`torch.cuda.get_device_properties().total_memory`), a
little under the nominal figure. Peaks are the datasheets' dense (no sparsity) bf16 TFLOP/s: the MFU
denominator the recipe's MFU column uses (an H100's measured matmul ceiling, about 790, would read 25% higher).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    kind: str
    name: str
    memory_gib: float
    peak_tflops: float | None  # None: unknown (a CPU), no MFU or step time from the table


DEVICES = {
    "h100": Device("h100", "NVIDIA H100 80GB (SXM)", 79.1, 989.0),
    "h100_pcie": Device("h100_pcie", "NVIDIA H100 80GB PCIe", 79.1, 756.0),
    "h200": Device("h200", "NVIDIA H200 141GB", 139.8, 989.0),
    "b200": Device("b200", "NVIDIA B200 180GB", 178.4, 2250.0),
    "a100_80g": Device("a100_80g", "NVIDIA A100 80GB", 79.2, 312.0),
    "a100_40g": Device("a100_40g", "NVIDIA A100 40GB", 39.4, 312.0),
    "l40s": Device("l40s", "NVIDIA L40S 48GB", 44.4, 362.0),
}
# MFU of a device the table does not know (a CPU run, another GPU) is stated against the H100's peak.
FALLBACK_PEAK_KIND = "h100"

# Fragments of torch.cuda.get_device_name(), most specific first; None: decided by the memory (A100 40/80 GB).
_NAME_FRAGMENTS = (("H200", "h200"), ("H100 PCIe", "h100_pcie"), ("H100", "h100"), ("B200", "b200"),
                   ("A100", None), ("L40S", "l40s"))


def kind_of(device_name: str, memory_gib: float | None = None) -> str | None:
    """The table's kind for a device name as torch reports it, or None when the table does not know it."""
    for fragment, kind in _NAME_FRAGMENTS:
        if fragment in device_name:
            return kind or ("a100_80g" if (memory_gib or 80) > 60 else "a100_40g")
    return None


def peak_tflops(device_name: str | None, memory_gib: float | None = None) -> tuple[float, str]:
    """(peak bf16 TFLOP/s, the kind it is the peak of) for a device name; unknown devices get the fallback's."""
    kind = kind_of(device_name or "", memory_gib) or FALLBACK_PEAK_KIND
    return DEVICES[kind].peak_tflops, kind
