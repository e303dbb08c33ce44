"""README's code map ("How the code is organised") names every module of the package, and only modules that exist.

How the map is read: a floor's first line (its label at the left margin) starts at the package root; `dir/` moves
into that directory, `dir/name.py` names that file and moves into its directory, a bare `name.py` is a file of the
directory the map is in."""
from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "ov_train"
TOKEN = re.compile(r"[\w./]+")
DIRECTORY = re.compile(r"(?:\w+/)+")
MODULE = re.compile(r"(?:\w+/)*\w+\.py")


def code_map(readme: str) -> str:
    section = readme.split("## How the code is organised", 1)[1]
    return section.split("```", 2)[1].split("\n", 1)[1]


def named_paths(block: str) -> tuple[set[str], set[str]]:
    """The modules and directories the map names, as paths under ov_train/."""
    modules, directories, here = set(), set(), ""
    for line in block.splitlines():
        if line[:1].strip():  # a floor's label: back to the package root
            here = ""
        for token in TOKEN.findall(line):
            token = token.rstrip(".")
            if DIRECTORY.fullmatch(token):
                here = token
                directories.add(token)
            elif MODULE.fullmatch(token):
                if "/" in token:
                    here = token.rsplit("/", 1)[0] + "/"
                    modules.add(token)
                else:
                    modules.add(here + token)
    return modules, directories


def package_modules() -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_the_code_map_names_every_module_and_nothing_else():
    modules, directories = named_paths(code_map((REPO / "README.md").read_text()))
    assert not package_modules() - modules, f"modules the README's code map does not name: {sorted(package_modules() - modules)}"
    assert not modules - package_modules(), f"the README's code map names modules that do not exist: {sorted(modules - package_modules())}"
    missing = sorted(d for d in directories if not (PACKAGE / d).is_dir())
    assert not missing, f"the README's code map names directories that do not exist: {missing}"


@pytest.mark.parametrize(("block", "wrong"), [
    ("ground    constants.py, utils/ logging.py\n", {"missing": {"devices.py"}}),
    ("ground    constants.py, gone.py\nrun       cli/ train.py, helpers.py\n", {"extra": {"gone.py", "cli/helpers.py"}}),
])
def test_the_reading_catches_a_forgotten_and_a_made_up_module(block, wrong):
    modules, _ = named_paths(block)
    if "missing" in wrong:
        assert "devices.py" in package_modules() - modules and "utils/logging.py" in modules
    else:
        assert modules - package_modules() == wrong["extra"]
