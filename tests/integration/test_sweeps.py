"""Sweeps through submitit: `python train.py -m hydra/launcher=local KEY=a,b trainer.devices=2` runs two jobs of
two processes each, end to end, as a SLURM sweep (hydra/launcher=slurm) would on a cluster.

Each job gets its own run directory under the sweep directory and its own W&B run, grouped by the sweep and named
by the job's swept override, read back from W&B's own files; no other directory appears (Lightning starting its
own rank 1 would re-run the sweep command and write another sweep).
"""
from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, SMALL_DATA
from tests.integration.test_dashboards import read_wandb_run
from tests.processes import run_one

# A sweep of training runs: `pytest -m 'not slow'` leaves it out.
pytestmark = pytest.mark.slow

RATES = ("1e-5", "2e-5")


def test_a_local_submitit_sweep_runs_one_job_per_value_each_on_two_processes(tmp_path, small_data_root):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=local", f"stage.parts.llm={','.join(RATES)}",
        f"hydra.sweep.dir={sweep}", f"data.root={small_data_root}", *SMALL_DATA, "logger=wandb",
        "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.limit_val_batches=2",
        "export=false", "data.record_keys=true",
    ]
    run_one(command, tmp_path / "sweep.log", timeout=420, cwd=tmp_path)

    # The sweep directory and nothing else: no duplicate sweep or run directories, here or in the sweep.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep", "sweep.log"]
    assert sorted(p.name for p in sweep.iterdir()) == [".submitit", "0", "1", "multirun.yaml"]
    for job, rate in enumerate(RATES):
        job_dir = sweep / str(job)
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").stage.parts.llm == float(rate)
        assert json.loads((job_dir / "summary.json").read_text())["steps"] == 2
        # Both of the job's processes trained (each records the batches it consumed).
        ranks = {json.loads(line)["rank"] for line in (job_dir / "consumed_keys.jsonl").read_text().splitlines()}
        assert ranks == {0, 1}
        # One W&B run per job (rank 0's), grouped by the sweep and named by the job's override.
        assert len(list(job_dir.glob("wandb/offline-run-*"))) == 1
        record, history = read_wandb_run(job_dir)
        name, override = record.display_name.split(" ")
        key, value = override.split("=")  # as Hydra wrote the job's override (1e-05)
        assert (name, key, float(value)) == (f"onevision-tiny-{job}", "stage.parts.llm", float(rate))
        assert record.run_group == str(sweep)
        assert [row["train/loss"] > 0 for row in history if "train/loss" in row] == [True, True]
