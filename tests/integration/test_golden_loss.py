"""A golden loss curve: the first steps of the default tiny run, checked in (tests/golden/tiny_onevision_loss.json).

Any change in the numerics (initialisation, data order, preprocessing, template, forward, loss, optimizer,
schedule) moves these losses by far more than the tolerance; CPU thread counts and instruction sets move them
by about 1e-7 relative. When a change is meant to alter them, record the new curve with
`OV_RECORD_GOLDEN=1 python -m pytest tests/integration/test_golden_loss.py` and say why in the commit.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from ov_train.run import train
from tests.conftest import compose_config

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_onevision_loss.json"


@pytest.mark.slow
def test_the_default_tiny_run_follows_the_golden_loss_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    run_dir = tmp_path / "run"
    overrides = [*golden["overrides"], "trainer.enable_progress_bar=false"]
    train(compose_config(overrides, run_dir=run_dir))
    with open(next(run_dir.glob("csv/*/metrics.csv"))) as f:
        measured = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    if os.environ.get("OV_RECORD_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({**golden, "losses": measured}, indent=2) + "\n")
        pytest.skip(f"recorded {len(measured)} losses into {GOLDEN}")
    assert len(measured) == len(golden["losses"])
    tolerance = golden["relative_tolerance"]
    off = [(batch, want, got) for batch, (want, got) in enumerate(zip(golden["losses"], measured), start=1)
           if abs(got - want) > tolerance * abs(want)]
    assert not off, "loss curve moved (batch, golden, measured): " + "; ".join(f"{b}: {w!r} -> {g!r}" for b, w, g in off)
