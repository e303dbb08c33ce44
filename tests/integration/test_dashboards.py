"""Short runs with each logger: the same dashboard metrics in CSV, an offline W&B run, TensorBoard event files and
an MLflow file store, each read back through its own library; run names. Sweeps: test_sweeps.py."""
import csv
import json
import math
import os
import struct
import time

import pytest
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from wandb.proto import wandb_internal_pb2

from ov_train.config.run_plan import logger_plan
from ov_train.run import train
from ov_train.training.loggers import build_logger
from ov_train.training.metrics import ValidationPredictions
from tests.conftest import CONF, SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

STEPS = 3
# perf/mfu: GPUs (or metrics.peak_tflops)
PERF = ("perf/tokens_per_s", "perf/samples_per_s", "perf/tflops_per_device", "perf/rank_imbalance",
        "perf/rank_imbalance_max", "perf/rank_idle")
PARTS = ("vision_tower", "projector", "llm")


def overrides(small_data_root, logger: str) -> list[str]:
    return [f"trainer.max_steps={STEPS}", f"data.root={small_data_root}", *SMALL_DATA, f"logger={logger}", "export=false"]


def run(tmp_path, small_data_root, logger: str):
    run_dir = tmp_path / logger
    train(compose_config(overrides(small_data_root, logger), run_dir=run_dir))
    return run_dir


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, small_data_root):
    return run(tmp_path_factory.mktemp("dash"), small_data_root, "csv")


def csv_rows(run_dir) -> list[dict]:
    path = run_dir / "csv" / "onevision-tiny" / "metrics.csv"  # named like the W&B run
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]


def test_csv_has_throughput_mfu_and_gradient_norms(csv_run):
    rows = [r for r in csv_rows(csv_run) if "perf/tokens_per_s" in r]
    assert len(rows) == STEPS  # trainer.log_every_n_steps=1
    # The console's step numbers (`step 1/3` ... `step 3/3`, trainer.global_step after the step), validation at the
    # last; no MFU against a GPU's peak on this CPU.
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in csv_rows(csv_run) if "val/loss" in r] == [STEPS]
    assert not any("perf/mfu" in r for r in csv_rows(csv_run))
    for row in rows:
        keys = set(PERF) | {"grad_norm/total", "train/loss", "train/nonfinite_batches"}
        keys |= {f"grad_norm/{p}" for p in PARTS} | {f"lr/{p}" for p in PARTS}
        assert keys <= row.keys()
        assert all(math.isfinite(row[k]) for k in keys)
        assert row["perf/tokens_per_s"] > 0 and row["perf/samples_per_s"] > 0
        assert row["perf/rank_imbalance"] == 1.0 and row["perf/rank_idle"] == 0.0  # one process waits for no other
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


def wandb_records(run_dir) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run, from its LevelDB-style log of protobuf records: 32 KiB blocks of
    chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = _parse_records(path.read_bytes())
    # wandb-core writes the file in a process of its own: on a loaded machine its last records (the final history
    # row, the exit record) can land a moment after finish() returns.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = _parse_records(path.read_bytes())
    return records


def _parse_records(data: bytes) -> list[wandb_internal_pb2.Record]:
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
    return records


def read_wandb_run(run_dir) -> tuple[wandb_internal_pb2.RunRecord, list[dict]]:
    """The run record and history rows of an offline run."""
    records = wandb_records(run_dir)
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


def csv_series(run_dir, key: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), row[key]) for row in csv_rows(run_dir) if key in row]


def tensorboard_run(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard event files, as read by TensorBoard itself: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run_dir / "tensorboard").iterdir()
    assert version.name == "onevision-tiny"
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(run_dir):
    """The run in the MLflow SQLite store in the run directory, and {metric: [(step, value)]}, through MLflow's client
    with no opt-in (a file store needs MLFLOW_ALLOW_FILE_STORE)."""
    from mlflow.tracking import MlflowClient

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and not (run_dir / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (record,) = client.search_runs([client.get_experiment_by_name("ov_train").experiment_id])
    history = {k: client.get_metric_history(record.info.run_id, k) for k in record.data.metrics}
    return record, {k: sorted((m.step, m.value) for m in v) for k, v in history.items()}


@pytest.fixture(scope="module")
def tensorboard_and_mlflow_run(tmp_path_factory, small_data_root):
    """One run logging to TensorBoard and MLflow at once (Lightning takes a list), each logger built by
    build_logger from its own `logger` config: one training run for both."""
    import ov_train.run

    def both(plan, run_dir, config):
        kinds = ("tensorboard", "mlflow")
        return [build_logger(logger_plan(compose_config(overrides(small_data_root, kind))), run_dir, config) for kind in kinds]

    run_dir = tmp_path_factory.mktemp("tb_mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ov_train.run, "build_logger", both)
        train(compose_config(overrides(small_data_root, "tensorboard"), run_dir=run_dir))
    return run_dir


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_tensorboard_and_mlflow_get_the_same_metrics_as_csv(csv_run, tensorboard_and_mlflow_run, logger):
    run_dir = tensorboard_and_mlflow_run
    if logger == "tensorboard":
        series = tensorboard_run(run_dir)
        assert OmegaConf.load(next(run_dir.glob("tensorboard/*/hparams.yaml"))).stage.parts.llm == 1e-5
    else:
        record, series = mlflow_run(run_dir)
        assert record.info.run_name == "onevision-tiny" and record.data.tags["group"] == "onevision"
        assert float(record.data.params["stage/parts/llm"]) == 1e-5  # the resolved config, flattened
    in_csv = {k for row in csv_rows(csv_run) for k in row} - {"step"}
    assert set(series) == in_csv
    # The same deterministic run, so the same values at the same steps (TensorBoard keeps float32).
    for key in ("train/loss", "grad_norm/total", "lr/llm", "val/loss", "val/accuracy_video"):
        steps, values = zip(*series[key])
        assert list(steps) == [step for step, _ in csv_series(csv_run, key)]
        assert list(values) == pytest.approx([value for _, value in csv_series(csv_run, key)], rel=1e-6)


def test_mlflow_writes_a_sqlite_store_the_client_reads_without_opt_in(tmp_path, monkeypatch):
    """README: `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`; MLflow's client reads the store as is."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the directory the run started from
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = build_logger(logger_plan(compose_config(["logger=mlflow"])), run_dir, {"stage": {"name": "onevision"}})
    logger.log_metrics({"train/loss": 2.5}, step=10)
    logger.finalize("success")
    record, series = mlflow_run(run_dir)
    assert series == {"train/loss": [(10, 2.5)]} and record.data.params["stage/name"] == "onevision"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
