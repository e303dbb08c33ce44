"""Processes started by a launcher are adopted by Lightning; a job whose processes do not match the trainer, or a
multirun that would leave Lightning to start them, is refused before any work."""
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from ov_train.config.run_plan import ConfigError, resolve_plan
from ov_train.strategies import adopt_launcher_tasks
from tests.conftest import CONF, compose_config

DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch):
    """monkeypatch, and none of torch.distributed's variables before or after (adopting a task exports them)."""
    for key in DISTRIBUTED:
        monkeypatch.setenv(key, "")  # restored (here: removed) at teardown
        monkeypatch.delenv(key)
    return monkeypatch


def submitit_local_task(env, task: int, tasks: int) -> None:
    """What submitit's local executor sets in the environment of task `task` of a job."""
    for key, value in {
        "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": str(tasks),
        "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_GLOBALID": str(task), "SUBMITIT_LOCAL_LOCALID": str(task),
    }.items():
        env.setenv(key, value)


def test_local_submitit_tasks_are_adopted_by_lightning(env):
    submitit_local_task(env, task=1, tasks=2)
    resolve_plan(compose_config(["trainer.accelerator=cpu", "trainer.devices=2"]))
    adopt_launcher_tasks()
    lightning = LightningEnvironment()
    assert lightning.creates_processes_externally  # Lightning will not start processes of its own
    assert (lightning.local_rank(), lightning.node_rank()) == (1, 0)
    assert lightning.main_address and 20000 <= lightning.main_port <= 60000  # the same for every task of the job


def test_a_job_with_fewer_tasks_than_devices_is_refused(env):
    submitit_local_task(env, task=0, tasks=1)  # the plugin's submitit_local: one task per job
    with pytest.raises(ConfigError, match=r"= 2 but this submitit job has 1 task.*hydra.launcher.tasks_per_node=2"):
        resolve_plan(compose_config(["trainer.accelerator=cpu", "trainer.devices=2"]))


def test_slurm_tasks_are_left_to_lightnings_slurm_environment(env):
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8",
                       "SLURM_JOB_NAME": "ov", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}.items():
        env.setenv(key, value)
    resolve_plan(compose_config(["trainer.num_nodes=2", "trainer.devices=8", "trainer.accelerator=cpu"]))
    adopt_launcher_tasks()
    assert "LOCAL_RANK" not in os.environ and SLURMEnvironment.detect()
    with pytest.raises(ConfigError, match="= 8 but this submitit job has 16 task"):
        resolve_plan(compose_config(["trainer.devices=8", "trainer.accelerator=cpu"]))


def test_a_multirun_of_several_processes_needs_a_launcher_that_starts_them(env, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["trainer.accelerator=cpu", "trainer.devices=2", "hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}"]
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra does inside each job of the basic launcher
    try:
        with pytest.raises(ConfigError, match="need a launcher that starts them: hydra/launcher=local"):
            resolve_plan(compose_config(["trainer.accelerator=cpu", "trainer.devices=2"]))
        resolve_plan(compose_config(["trainer.accelerator=cpu", "trainer.devices=1"]))
    finally:
        HydraConfig.instance().cfg = None
