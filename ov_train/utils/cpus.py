"""How many CPUs this process may use, as the scheduler, the container and the job system allow.

`os.cpu_count()` is the machine's count; on a shared node, in a container or under SLURM the process may use far
fewer, and threads or loader workers sized by the machine oversubscribe it (a 15x slowdown was measured on a
2-core machine under load 6). Every place that sizes threads or workers asks here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cgroup_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: the smallest of its affinity mask, its cgroup quota and SLURM's CPUs per task."""
    limits = [_affinity()]
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        limits.append(max(1, math.floor(quota)))
    slurm = _slurm_cpus()
    if slurm is not None:
        limits.append(slurm)
    return max(1, min(limits))


def cpus_per_process(local_processes: int, cgroup_root: Path = CGROUP_ROOT) -> int:
    """This process's share when `local_processes` processes of the same run share the node's usable CPUs.

    Processes launched by one launcher on a node usually share one affinity mask and cgroup; under SLURM each
    task has its own `SLURM_CPUS_PER_TASK` already, so its share is not divided again.
    """
    cpus = usable_cpus(cgroup_root)
    if _slurm_cpus() is not None:
        return cpus
    return max(1, cpus // max(1, local_processes))
