"""hydra/launcher=slurm: the submitit launcher's settings, sized by the trainer, composed without submitting."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    # The launcher's folder interpolates hydra.sweep.dir, which the hydra: resolver reads from HydraConfig.
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _reset_hydra_config():
    yield
    HydraConfig.instance().cfg = None


def test_slurm_launcher_defaults():
    launcher = compose_with_hydra([]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0
    for key in ("partition", "account", "mem_gb", "signal_delay_s", "max_num_timeout"):
        assert key in launcher
    # SIGTERM ahead of the time limit: the run saves last.ckpt at a step boundary; SLURM may requeue it.
    assert launcher.additional_parameters == {"signal": f"TERM@{launcher.signal_delay_s}", "requeue": True}


def test_two_nodes_of_eight_gpus_follow_the_trainer_and_instantiate_without_submitting():
    cfg = compose_with_hydra(["trainer.num_nodes=2", "trainer.devices=8", "hydra.launcher.partition=gpu",
                              "hydra.launcher.account=proj", "hydra.launcher.timeout_min=600"])
    launcher = instantiate(cfg.hydra.launcher)
    # One SLURM task per GPU, as many as Lightning's devices, so SLURMEnvironment accepts the world.
    assert launcher.params["nodes"] == cfg.trainer.num_nodes == 2
    assert launcher.params["gpus_per_node"] == launcher.params["tasks_per_node"] == cfg.trainer.devices == 8
    assert (launcher.params["partition"], launcher.params["account"]) == ("gpu", "proj")
    assert launcher.params["timeout_min"] == 600
    # A task that fails ends the others (srun reads SLURM_KILL_BAD_EXIT as --kill-on-bad-exit): in the job script.
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -m x", folder="/tmp/f", **{
        k: v for k, v in launcher.params.items() if k in ("nodes", "setup", "additional_parameters", "partition")})
    assert script.index("export SLURM_KILL_BAD_EXIT=1") < script.index("srun")


@pytest.mark.slow
def test_train_py_composes_a_slurm_sweep_job():
    command = [sys.executable, "train.py", "hydra/launcher=slurm", "trainer.num_nodes=2", "trainer.devices=8",
               "stage.parts.llm=2e-5", "--cfg", "all", "--resolve"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.hydra.launcher.nodes == 2 and printed.hydra.launcher.tasks_per_node == 8
    assert printed.stage.parts.llm == 2e-5
