"""Bad data end to end: a run whose every sample is unusable stops with the reasons, instead of skipping forever."""
import pytest

from ov_train.data.stream import StreamError
from ov_train.run import train
from tests.conftest import SMALL_DATA, compose_config

# Training runs: `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow


def test_max_length_below_every_sample_stops_the_run_naming_the_reason(tmp_path, small_data_root):
    # stage.max_length=8 used to log a skip per sample, thousands of them, and never reach a step.
    overrides = [f"data.root={small_data_root}", *SMALL_DATA, "trainer.max_steps=2", "stage.max_length=8",
                 "data.max_skips_in_a_row=25"]
    with pytest.raises(StreamError, match=r"^25 training samples in a row skipped: too_long 25 \(stage.max_length=8\)"):
        train(compose_config(overrides, run_dir=tmp_path / "run"))
