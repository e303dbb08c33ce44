"""Installed anywhere: every console script answers, and a wheel (not the checkout) trains from another directory.

The wheel is built from the tracked sources without network (the build backend of this environment), installed
with `pip install --target` into a folder of its own and run with only that folder added to the path: the
configs and recipes it finds are the ones that ship inside the package.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# What each console script is asked, and a fragment its answer must hold.
SMOKE = {
    "ov-train": (["--cfg", "job", "stage=pretrain"], "name: pretrain"),
    "ov-export": (["--help"], "a checkpoint written by ov_train"),
    "ov-data": (["--help"], "convert"),
    "ov-chat": (["--help"], "usage: ov-chat"),
    "ov-eval": (["--help"], "usage: ov-eval"),
}


def test_every_console_script_has_a_smoke_test():
    assert set(SCRIPTS) == set(SMOKE)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_answers(script, tmp_path):
    """The entry point pyproject.toml declares, called as the generated script would call it, from elsewhere."""
    module, _, function = SCRIPTS[script].partition(":")
    args, expected = SMOKE[script]
    code = f"import sys; from {module} import {function}; sys.argv = [{script!r}, *sys.argv[1:]]; sys.exit({function}())"
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


def test_a_users_config_directory_adds_to_the_shipped_one(tmp_path):
    """README, Quickstart: --config-dir DIR and hydra.searchpath=[file://DIR] add the user's files; Hydra searches
    them after the shipped configs, so a file named like a shipped one is shadowed by it."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "my_run.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /stage: mid\nseed: 7\n")
    (conf / "stage").mkdir()
    (conf / "stage" / "onevision.yaml").write_text("name: mine\n")
    module, _, function = SCRIPTS["ov-train"].partition(":")
    code = f"import sys; from {module} import {function}; sys.argv = ['ov-train', *sys.argv[1:]]; sys.exit({function}())"
    for where in (["--config-dir", str(conf)], [f"hydra.searchpath=[file://{conf}]"]):
        result = subprocess.run([sys.executable, "-c", code, *where, "experiment=my_run", "--cfg", "job"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "\nseed: 7\n" in result.stdout and "  name: mid\n" in result.stdout
        shadowed = subprocess.run([sys.executable, "-c", code, *where, "stage=onevision", "--cfg", "job"],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert "  name: onevision\n" in shadowed.stdout and "name: mine" not in shadowed.stdout


def test_a_wheel_trains_from_any_directory(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO / "ov_train", source / "ov_train", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ov_train-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    assert (site / "ov_train" / "conf" / "config.yaml").is_file() and (site / "ov_train" / "data_recipes").is_dir()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # As a new user's shell has it (in-process runs of other tests set DS_ACCELERATOR in this one).
    env = {**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import ov_train; print(ov_train.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site)
    run_dir = elsewhere / "run"
    overrides = ["stage=onevision", "trainer.max_steps=1", "data.synthetic.train_per_subset=64",
                 "data.synthetic.val_per_subset=16", "data.num_workers=0", "logger=none",
                 "trainer.limit_val_batches=1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run([str(site / "bin" / "ov-train"), *overrides], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
    assert (run_dir / "train.log").is_file() and (run_dir / "parameters.txt").is_file()
    assert (run_dir / "export" / "config.json").is_file()
    # The first hour: no warnings, deprecations or tips from the libraries on a run that does nothing unusual.
    exported = subprocess.run([str(site / "bin" / "ov-export"), str(run_dir / "checkpoints" / "last.ckpt"),
                               str(elsewhere / "again")], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert (elsewhere / "again" / "config.json").is_file()
    for output in (result.stdout + result.stderr, exported.stdout + exported.stderr):
        noise = [line for line in output.splitlines() if re.search(r"warn|deprecat|tip\b", line, re.I)]
        assert not noise, noise


def test_a_config_value_error_is_one_message_not_a_traceback(tmp_path):
    # Checked before any work (no model, no data): the message names the key; nothing of our own frames above it.
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "trainer.max_steps=-2",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "trainer.max_steps=-2 must be a positive integer" in output
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
