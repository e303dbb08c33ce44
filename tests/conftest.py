"""Shared fixtures: the real config composed with test overrides, a tiny model, a small synthetic data set,
a mixed batch (anyres, multi-image, video and text-only samples)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ov_train.config.compose import compose
from ov_train.resources import CONF_DIR
from tests.helpers import noise_png, raw_sample

REPO = Path(__file__).resolve().parents[1]
CONF = CONF_DIR  # the shipped configs, inside the package


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Keep every cache (tokenizer, synthetic shards, W&B) inside the test session's temp dir."""
    cache = tmp_path_factory.mktemp("ov_cache")
    os.environ["OV_TRAIN_CACHE"] = str(cache)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


def compose_config(overrides: list[str], run_dir: Path | None = None):
    """The shipped config with `overrides`, as ov-train composes it (ov_train.config.compose)."""
    return compose(overrides, run_dir)


def plan_of(overrides: list[str], run_dir: Path | None = None):
    """The run plan of the shipped config with `overrides`."""
    from ov_train.config.run_plan import resolve_plan

    return resolve_plan(compose(overrides, run_dir))


SMALL_DATA = [
    "data.synthetic.train_per_subset=64",
    "data.synthetic.val_per_subset=16",
    "data.num_workers=0",
    "data.batch_size=4",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session")
def small_data_root(tmp_path_factory):
    from ov_train.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic(root, train_per_subset=64, val_per_subset=16, image_px=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(_offline_cache):
    from ov_train.model.build import build_model

    return build_model(plan_of([]).model, _offline_cache)


@pytest.fixture(scope="module")
def mixed_batch(tiny_model_and_tokenizer):
    """The tiny model, 5 processed samples and their collated batch: an anyres image, three images of which
    some single-crop, a video, text only, a wide anyres image."""
    from ov_train.config.media import MediaSettings
    from ov_train.data.samples import SampleProcessor, collate
    from ov_train.data.video import encode_mp4
    from ov_train.vision.geometry import VisionGeometry

    model, tokenizer = tiny_model_and_tokenizer
    geom = VisionGeometry.from_model_config(model.config)
    process = SampleProcessor(tokenizer, geom, "qwen_1_5", MediaSettings.of("anyres_max_9", 8), max_length=4096)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    raws = [
        raw_sample("a", "<image>\nWhat colour?", "red", [noise_png(70, 30, 1)]),
        raw_sample("b", "<image>\n<image>\n<image>\nWhich one?", "second",
                   [noise_png(32, 32, 2), noise_png(50, 20, 3), noise_png(16, 64, 4)]),
        raw_sample("c", "<video>\nWhich way?", "left", video=encode_mp4(frames, fps=1)),
        raw_sample("d", "What is the opposite of up?", "down"),
        raw_sample("e", "<image>\nHow many?", "three", [noise_png(100, 250, 5)]),
    ]
    examples = [process(r) for r in raws]
    return model, examples, collate(examples, tokenizer.pad_token_id)


def pytest_collection_finish(session):
    """The DeepSpeed ops the selected tests need start building now, in the background (tests/prebuild.py)."""
    from tests.prebuild import start_deepspeed_builds

    start_deepspeed_builds(session.items)


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures, which may run the engine
def pytest_runtest_setup(item):
    """A test that needs a DeepSpeed op still building in the background builds the rest itself (tests/prebuild.py)."""
    from tests.prebuild import take_over_builds

    take_over_builds(item)


def pytest_sessionfinish(session, exitstatus):
    """Loader workers a failed test left behind ignore a group SIGTERM; multiprocessing's exit would wait on them
    for ever (a worker blocked in C even on its SIGTERM): stop them as ov-train does when it ends. A background
    build still running stops too."""
    from ov_train.training.loader_workers import stop_loader_workers
    from tests.prebuild import stop_deepspeed_builds

    stop_loader_workers(grace_s=2.0)
    stop_deepspeed_builds()

