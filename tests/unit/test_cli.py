"""One command-line front end: `ov-train COMMAND ...` runs every command of the table as its own console script
does, and `ov-train plan` composes its config through Hydra's command line, as training does."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ov_train.cli import COMMANDS, main
from ov_train.cli.data import main as ov_data
from ov_train.config.compose import compose
from ov_train.config.run_plan import resolve_plan
from ov_train.planner.report import plan_run
from tests.conftest import REPO
from tests.fixtures_data import conversation, write_jsonl

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_the_table_is_the_console_scripts():
    """pyproject.toml's console scripts are `ov-train` and the table's own scripts, each its command's main."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    table = {script: f"ov_train.cli.{name}:main" for name, script in COMMANDS.items() if script}
    assert scripts == {"ov-train": "ov_train.cli:main", **table}


@pytest.mark.parametrize(("name", "usage"), [("data", "usage: ov-data"), ("export", "usage: ov-export"),
                                             ("chat", "usage: ov-chat"), ("eval", "usage: ov-eval"),
                                             ("bench", "usage: python -m ov_train.bench"),
                                             ("plan", "usage: ov-train plan")])
def test_every_command_answers_help(name, usage, capsys):
    try:
        code = main([name, "--help"])  # plan prints its usage and returns
    except SystemExit as stop:  # argparse exits
        code = stop.code
    assert code == 0 and usage in capsys.readouterr().out


def test_ov_train_data_is_ov_data(tmp_path, capsys):
    records = [{"id": f"s{i}", "conversations": conversation(f"Question {i}?")} for i in range(5)]
    source = write_jsonl(tmp_path / "chat.jsonl", records, raw_lines=("{not json",))
    assert main(["data", "convert", str(source), "--out", str(tmp_path / "shards"), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shards"), "--json"]) == 0
    through_ov_train = json.loads(capsys.readouterr().out)
    assert ov_data(["inspect", str(tmp_path / "shards"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == through_ov_train
    assert through_ov_train["samples"] == 5 and through_ov_train["rejects"] == {"malformed_line": 1}


def test_plan_is_composed_by_hydra_as_training_is(tmp_path, monkeypatch, capsys):
    """Hydra's own options reach `plan` (--cfg prints the composed config, nothing planned); a plan equals the one
    of the same overrides composed outside the command line, and leaves no run directory behind."""
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--cfg", "job", "stage=pretrain", "plan.device=h200"]) == 0
    shown = capsys.readouterr().out
    assert "  name: pretrain\n" in shown and "  device: h200\n" in shown and "GiB" not in shown
    overrides = ["plan.device=h200", "trainer.devices=2", "strategy=ddp"]
    assert main(["plan", *overrides, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    expected = plan_run(resolve_plan(compose(overrides), machine=False))
    for timing in ("trace_s",):
        planned.pop(timing), expected.pop(timing)
    assert planned == expected and planned["devices"] == 2
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ nor train.log


@pytest.mark.slow
def test_a_checkout_runs_every_command_through_train_py(tmp_path):
    """`python train.py COMMAND` is `ov-train COMMAND` in a checkout, from any directory."""
    for args, expected in ((["plan", "--cfg", "job", "model=tiny"], "name: tiny"), (["export", "--help"], "ov-export"),
                           (["--cfg", "job", "stage=mid"], "name: mid")):
        result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert expected in result.stdout
    assert list(tmp_path.iterdir()) == []
