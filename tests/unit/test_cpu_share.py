"""Each training process sizes its loader workers and torch threads from the CPUs it may use, not the machine's."""
import os

import pytest

from ov_train.config.options import AUTO_MAX_WORKERS, cpu_share
from ov_train.utils import cpus
from tests.conftest import plan_of


@pytest.fixture
def eight_cpus(monkeypatch):
    """A process allowed CPUs 0-7 (affinity), no cgroup quota, no SLURM."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda root=None: None)


def test_workers_take_half_the_cpus_and_threads_the_rest():
    assert (cpu_share(None, 1, cpus=1).workers, cpu_share(None, 1, cpus=1).threads) == (0, 1)
    assert (cpu_share(None, 1, cpus=2).workers, cpu_share(None, 1, cpus=2).threads) == (1, 1)
    assert (cpu_share(None, 1, cpus=64).workers, cpu_share(None, 1, cpus=64).threads) == (AUTO_MAX_WORKERS, 64 - AUTO_MAX_WORKERS)
    given = cpu_share(3, 1, cpus=2)  # data.num_workers as the user set it; threads still at least one
    assert (given.workers, given.threads, given.auto_workers) == (3, 1, False)
    assert "1 loader worker(s) (sized from them), 1 torch thread(s)" in cpu_share(None, 1, cpus=2).describe()


@pytest.mark.parametrize("data", [[], ["data=recipe", "data.root=/nonexistent"]])
def test_the_default_data_configs_size_workers_from_the_process_cpus(eight_cpus, monkeypatch, data):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-CPU share: the machine
    if data:  # data=recipe used to start 4 workers on 2 cores; its shards are not read to plan
        monkeypatch.setattr("ov_train.config.run_plan.root_problems", lambda spec, root: [])
    plan = plan_of([*data, "data.num_workers=null"])
    assert (plan.cpus.cpus, plan.data.num_workers, plan.cpus.threads) == (2, 1, 1)


def test_processes_of_one_run_split_the_cpus(eight_cpus):
    plan = plan_of(["data.num_workers=null", "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert (plan.cpus.cpus, plan.data.num_workers, plan.cpus.threads) == (4, 2, 2)
    assert plan_of(["data.num_workers=null"]).cpus.cpus == 8
