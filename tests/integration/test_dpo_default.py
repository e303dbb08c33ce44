"""The embedded default `python train.py stage=dpo` (model_stage/tiny_dpo.yaml on the tiny model and the synthetic
pairs) learns the preference: its held-out preference accuracy, 0 before the first step (every reward 0, and a pair
counts only when the chosen reward is strictly the greater). Several minutes on 2 CPU cores: the whole default run."""
from __future__ import annotations

import json

import pytest

from ov_train.run import train
from tests.conftest import compose_config

pytestmark = [pytest.mark.slow, pytest.mark.long]  # minutes: outside the default run


def test_the_embedded_dpo_default_learns_the_preference(tmp_path):
    summary = train(compose_config(["stage=dpo", "logger=csv", "trainer.enable_progress_bar=false"], run_dir=tmp_path))
    warm = json.loads((tmp_path / "warm_start" / "summary.json").read_text())
    assert (warm["stage"], warm["steps"], summary["steps"]) == ("onevision", 500, 100)
    assert summary["val_pairs"] == 600  # 200 held-out pairs of each source
    # Measured 0.790 (2026-12-08); 0.59 before model_stage/tiny_dpo.yaml. The goal, 0.9, is not reached yet.
    assert summary["val_preference_accuracy"] >= 0.75 and summary["val_reward_margin"] > 0
