"""The CPUs a process may use follow its affinity mask, cgroup quota and SLURM allocation, not the machine's count."""
import os

import pytest

from ov_train.utils import cpus


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)


def _cgroup_v2(tmp_path, text):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def test_affinity_bounds_the_count(tmp_path, monkeypatch, no_slurm):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cpus.usable_cpus(tmp_path) == 3


def test_cgroup_v2_quota_bounds_the_count(tmp_path, monkeypatch, no_slurm):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "250000 100000\n")) == 2
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "max 100000\n")) == 16
    assert cpus.usable_cpus(_cgroup_v2(tmp_path, "50000 100000\n")) == 1  # half a CPU still gets one


def test_cgroup_v1_quota_bounds_the_count(tmp_path, monkeypatch, no_slurm):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.usable_cpus(tmp_path) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.usable_cpus(tmp_path) == 16


def test_slurm_allocation_bounds_the_count_and_is_not_divided_again(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpus.usable_cpus(tmp_path) == 6
    assert cpus.cpus_per_process(4, tmp_path) == 6


def test_processes_of_one_run_share_the_node(tmp_path, monkeypatch, no_slurm):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cpus.cpus_per_process(1, tmp_path) == 8
    assert cpus.cpus_per_process(2, tmp_path) == 4
    assert cpus.cpus_per_process(3, tmp_path) == 2
    assert cpus.cpus_per_process(16, tmp_path) == 1
