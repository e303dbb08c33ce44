"""Short runs with each logger: the same dashboard metrics in CSV and in an offline W&B run; run names."""
import csv
import json
import math
import struct
import subprocess
import sys

import pytest
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from ov_train.config.run_plan import logger_plan
from ov_train.run import train
from ov_train.training.metrics import ValidationPredictions
from tests.conftest import CONF, REPO, SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

STEPS = 3
PERF = ("perf/tokens_per_s", "perf/samples_per_s", "perf/tflops_per_device", "perf/mfu")
PARTS = ("vision_tower", "projector", "llm")


def run(tmp_path, small_data_root, logger: str):
    overrides = [f"trainer.max_steps={STEPS}", f"data.root={small_data_root}", *SMALL_DATA, f"logger={logger}"]
    overrides.append("export=false")
    run_dir = tmp_path / logger
    train(compose_config(overrides, run_dir=run_dir))
    return run_dir


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, small_data_root):
    return run(tmp_path_factory.mktemp("dash"), small_data_root, "csv")


def csv_rows(run_dir) -> list[dict]:
    path = run_dir / "csv" / "onevision-tiny" / "metrics.csv"  # named like the W&B run
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]


def test_csv_has_throughput_mfu_and_gradient_norms(csv_run):
    rows = [r for r in csv_rows(csv_run) if "perf/mfu" in r]
    assert len(rows) == STEPS  # trainer.log_every_n_steps=1
    for row in rows:
        keys = set(PERF) | {"grad_norm/total", "train/loss", "train/nonfinite_batches"}
        keys |= {f"grad_norm/{p}" for p in PARTS} | {f"lr/{p}" for p in PARTS}
        assert keys <= row.keys()
        assert all(math.isfinite(row[k]) for k in keys)
        assert row["perf/tokens_per_s"] > 0 and row["perf/samples_per_s"] > 0
        assert 0 < row["perf/mfu"] < 1
        assert row["grad_norm/total"] > 0 and row["train/nonfinite_batches"] == 0
        # The total is the norm of the parts' norms.
        parts = math.sqrt(sum(row[f"grad_norm/{p}"] ** 2 for p in PARTS))
        assert row["grad_norm/total"] == pytest.approx(parts, rel=1e-5)
    losses = {k for r in csv_rows(csv_run) for k in r if k.startswith("train/loss_")}
    assert losses == {f"train/loss_{m}" for m in ("single_image", "multi_image", "video")}


def test_validation_writes_a_prediction_table(csv_run):
    lines = (csv_run / "predictions" / f"step_{STEPS}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    # metrics.predictions samples of each held-out modality.
    per_modality = compose_config([]).metrics.predictions
    assert {r["modality"] for r in rows} == {"single_image", "multi_image", "video"}
    assert len(rows) == 3 * per_modality
    for row in rows:
        assert row["step"] == STEPS and isinstance(row["correct"], bool) and isinstance(row["prediction"], str)
        # Teacher-forced greedy tokens, one per reference token: a correct row predicts the reference exactly.
        assert (row["prediction"] == row["reference"]) if row["correct"] else row["prediction"]
        assert row["prompt"].endswith("<|im_start|>assistant\n") and row["reference"].endswith("<|im_end|>")
        assert "<image><image>" not in row["prompt"] and "<video><video>" not in row["prompt"]


def read_wandb_run(run_dir) -> tuple[wandb_internal_pb2.RunRecord, list[dict]]:
    """The run record and history rows of an offline run, from its LevelDB-style log of protobuf records:
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:  # a table's fields come as nested keys (name, field)
                key, *field = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(key, {})[field[0]] = value
                else:
                    row[key] = value
            history.append(row)
    return run_record, history


def test_wandb_offline_run_gets_the_same_metrics_as_csv(csv_run, tmp_path, small_data_root):
    run_dir = run(tmp_path, small_data_root, "wandb")
    assert wandb.run is None  # finished with the fit: the next job of a multirun in this process gets its own
    record, history = read_wandb_run(run_dir)
    assert (record.display_name, record.run_group) == ("onevision-tiny", "onevision")
    config = {item.key: json.loads(item.value_json) for item in record.config.update}
    assert config["stage"]["parts"]["llm"] == 1e-5
    logged = {k for row in history for k in row if not k.startswith(("_", "trainer/"))}
    in_csv = {k for row in csv_rows(csv_run) for k in row} - {"step"}
    assert in_csv <= logged
    assert logged - in_csv == {"val/predictions"}  # the table goes to a file for CSV runs
    table = next(row["val/predictions"] for row in history if "val/predictions" in row)
    assert table["_type"] == "table-file" and table["ncols"] == len(ValidationPredictions.COLUMNS)


def test_each_sweep_job_gets_its_own_run_directory_and_run_name(tmp_path, small_data_root):
    command = [
        sys.executable, "train.py", "-m", "stage.parts.llm=1e-5,2e-5", f"hydra.sweep.dir={tmp_path}",
        f"data.root={small_data_root}", *SMALL_DATA, "logger=csv", "trainer.max_steps=1", "export=false",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in enumerate((1e-5, 2e-5)):
        job_dir = tmp_path / str(job)
        assert OmegaConf.load(job_dir / ".hydra" / "config.yaml").stage.parts.llm == lr
        assert (job_dir / "csv" / f"onevision-tiny-{job}" / "metrics.csv").is_file()
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()


def test_sweep_runs_are_grouped_by_sweep_directory(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["stage=pretrain", f"hydra.sweep.dir={tmp_path}", "hydra.mode=MULTIRUN", "hydra.job.num=3"]
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as Hydra does inside each job
    try:
        logger = logger_plan(cfg)
        assert (logger.run_name, logger.group) == ("pretrain-tiny-3", str(tmp_path))
    finally:
        HydraConfig.instance().cfg = None
