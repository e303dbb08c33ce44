"""Multi-node, started the way SLURM starts it: 2 "nodes" x 1 process on the loopback interface, each task started
with the environment `srun` gives it and `trainer.num_nodes=2 trainer.devices=1`, for ddp and fsdp2. Lightning's
SLURMEnvironment adopts the tasks (nothing respawned): both ranks train, into one run directory and one logger run,
and the per-step losses equal those of one node of 2 processes on the same global batches.

The tasks run `python -m tests.integration.test_strategies` (train.py plus the probe of test_strategies.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.integration.test_dashboards import read_wandb_run
from tests.integration.test_strategies import (
    expected_groups,
    layer_names,
    probe_records,
    run_train,
    train_command,
    train_overrides,
)
from tests.processes import free_port, run_together

# Training runs and subprocesses: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def srun_environment(node: int, nodes: int, job_id: str) -> dict[str, str]:
    """What `srun` sets for task `node` of a job of `nodes` nodes x 1 task, whose nodes are 127.0.0.1, .2, ..."""
    nodelist = f"127.0.0.[1-{nodes}]"
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": "ov-train", "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": str(nodes), "SLURM_NPROCS": str(nodes), "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": f"1(x{nodes})", "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURMD_NODENAME": f"127.0.0.{node + 1}", "SLURM_PROCID": str(node), "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(node), "SLURM_CPUS_PER_TASK": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # the "nodes" talk over the loopback interface
    }


def run_as_srun(overrides: list[str], root: Path, nodes: int = 2) -> None:
    """Each node's task started by us as srun would start it; Lightning must adopt them, not spawn its own."""
    # Lightning's SLURMEnvironment listens on 15000 + the job id's last 4 digits.
    job_id = f"42{free_port(15000, 25000) - 15000:04d}"
    commands = [
        (train_command([*overrides, f"trainer.num_nodes={nodes}", "trainer.devices=1"]),
         {**srun_environment(node, nodes, job_id), "OV_PROBE": str(root / "probe")})
        for node in range(nodes)
    ]
    run_together(commands, [root / f"node{n}.log" for n in range(nodes)], timeout=300, cwd=root)


def consumed_by_step(run_dir: Path) -> list[set]:
    """The sample keys each optimizer step consumed, from data.record_keys (all ranks)."""
    steps: dict[int, set] = {}
    for line in (run_dir / "consumed_keys.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.setdefault(record["batch"] - 1, set()).update(record["keys"])
    return [steps[k] for k in sorted(steps)]


def losses_by_step(records: list[dict]) -> list[float]:
    """Mean training loss of each optimizer step over every rank's batch."""
    per_step: dict[int, list[float]] = {}
    for record in records:
        for batch_idx, loss in record["losses"]:
            per_step.setdefault(batch_idx, []).append(loss)
    return [sum(v) / len(v) for _, v in sorted(per_step.items())]


@pytest.fixture(scope="module")
def one_node_reference(tmp_path_factory, small_data_root):
    """The same run on one node of 2 DDP processes (Lightning starts the second): the same readers (ov_train.data.stream
    numbers them rank x worker), so the same global batches, whatever launched the ranks."""
    root = tmp_path_factory.mktemp("reference")
    overrides = [
        *train_overrides(small_data_root, "onevision", 2, root / "run"), "strategy=ddp", "trainer.devices=2",
        "data.record_keys=true", "export=false", "trainer.limit_val_batches=2",
    ]
    run_train(overrides, root / "run", root / "probe")
    return root


@pytest.mark.parametrize(("strategy", "logger"), [("ddp", "wandb"), ("fsdp2", "csv")])
def test_two_nodes_started_like_srun_train_as_one_job(tmp_path, small_data_root, one_node_reference, strategy, logger):
    run_dir = tmp_path / "run"
    overrides = [
        *train_overrides(small_data_root, "onevision", 2, run_dir), f"strategy={strategy}", f"logger={logger}",
        "data.record_keys=true", "export=false", "trainer.limit_val_batches=2",
    ]
    run_as_srun(overrides, tmp_path)

    # Both ranks trained, with the stage's groups (and FSDP2's units).
    cfg = compose_config([*overrides, "trainer.num_nodes=2", "trainer.devices=1"])
    expected, layers = expected_groups(cfg), layer_names(cfg)
    records = probe_records(tmp_path / "probe", "end")
    assert [r["step"] for r in records] == [2, 2]
    for record in probe_records(tmp_path / "probe", "start"):
        assert record["groups"] == expected
        assert record["fsdp_units"] == (layers if strategy == "fsdp2" else [])
    # One run directory (nothing under the nodes' working directory but it), one logger run.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["probe", "run"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    if logger == "wandb":
        (offline,) = run_dir.glob("wandb/offline-run-*")
        _, history = read_wandb_run(run_dir)
        assert len([row for row in history if "train/loss" in row]) == 2
    else:
        (version,) = (run_dir / "csv").iterdir()
        assert (version / "metrics.csv").is_file()

    # The same global batches as one node of 2 DDP processes, and the same losses (FSDP2 reduces the gradients
    # DDP all-reduces, so they agree to float32 rounding).
    reference = one_node_reference
    assert consumed_by_step(run_dir) == consumed_by_step(reference / "run")
    ours = losses_by_step(records)
    theirs = losses_by_step(probe_records(reference / "probe", "end"))
    assert len(ours) == 2 and ours == pytest.approx(theirs, rel=1e-5)
