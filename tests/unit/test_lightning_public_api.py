"""Lightning's public API only: no `_private` Lightning name anywhere in the package but its one adapter module
(ov_train/utils/lightning_internals.py, pinned by test_lightning_internals.py), so a Lightning release that renames one
breaks that module's test, not a run.

Found by reading the source: imports of a private Lightning module or name; in a class built on a Lightning class,
`self._x` (or an override `def _x`) where `_x` belongs to Lightning's classes in its ancestry; elsewhere `obj._x`
where `_x` is a private name Lightning defines and the package does not.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from functools import cache
from pathlib import Path

import lightning

PACKAGE = Path(__file__).resolve().parents[2] / "ov_train"
ADAPTER = PACKAGE / "utils" / "lightning_internals.py"
LIGHTNING_MODULES = ("lightning", "pytorch_lightning", "lightning_fabric")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a source defines: functions, classes, assigned names and `self._x` / `cls._x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and private(node.id):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
              and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


@cache
def lightning_private_names() -> frozenset[str]:
    root = Path(lightning.__file__).parent
    return frozenset().union(*(defined_private_names(ast.parse(p.read_text())) for p in root.rglob("*.py")))


@cache
def class_private_names(cls: type) -> frozenset[str]:
    """Private names Lightning's classes in `cls`'s ancestry define or use on themselves."""
    names = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] in LIGHTNING_MODULES:
            names |= defined_private_names(ast.parse(inspect.getsource(inspect.getmodule(base))))
    return frozenset(names)


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def lightning_classes(path: Path) -> dict[str, type]:
    """The module's classes that derive from a Lightning class, by name. A module that imports no Lightning name but
    needs an optional package this environment lacks (lmms-eval's plugin) has none."""
    try:
        module = importlib.import_module(module_name(path))
    except ModuleNotFoundError as err:
        if "lightning" in path.read_text() or (err.name or "").split(".")[0] == "ov_train":
            raise
        return {}
    return {name: obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__
            and any(b.__module__.split(".")[0] in LIGHTNING_MODULES for b in obj.__mro__[1:])}


def violations(path: Path, own: set[str]) -> list[str]:
    tree = ast.parse(path.read_text())
    where = lambda node: f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"  # noqa: E731
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIGHTNING_MODULES:
            bad = [p for p in node.module.split(".") if private(p)] + [a.name for a in node.names if private(a.name)]
            found += [f"{where(node)}: from {node.module} import {name}" for name in bad]
        elif isinstance(node, ast.Import):
            found += [f"{where(node)}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in LIGHTNING_MODULES and any(private(p) for p in a.name.split("."))]
    classes = None
    for cls_node in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        inner = [n for n in ast.walk(cls_node) if n is not cls_node]
        if classes is None:
            classes = lightning_classes(path)
        cls = classes.get(cls_node.name)
        if cls is None:
            continue
        theirs = class_private_names(cls)
        for node in inner:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in theirs:
                found.append(f"{where(node)}: {cls_node.name} overrides Lightning's {node.name}")
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                  and node.attr in theirs):
                found.append(f"{where(node)}: {cls_node.name} uses Lightning's self.{node.attr}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and private(node.attr) and node.attr in lightning_private_names()
                and node.attr not in own and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{where(node)}: .{node.attr}")
    return found


def test_no_private_lightning_name_outside_the_adapter():
    sources = [p for p in sorted(PACKAGE.rglob("*.py")) if p != ADAPTER]
    own = set().union(*(defined_private_names(ast.parse(p.read_text())) for p in sources))
    found = [v for p in sources for v in violations(p, own)]
    assert not found, "private Lightning names (move them into utils/lightning_internals.py):\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scan itself: each kind of private use it is meant to catch, in a throwaway package module."""
    probe = PACKAGE / "utils" / "_probe_private_lightning.py"
    probe.write_text(
        "from lightning.fabric.connector import _PRECISION_INPUT\n"
        "from lightning.pytorch.callbacks import ModelCheckpoint\n\n\n"
        "class Mine(ModelCheckpoint):\n"
        "    def _save_checkpoint(self, trainer, filepath):\n"
        "        return self._last_global_step_saved\n\n\n"
        "def f(trainer):\n"
        "    return trainer._checkpoint_connector\n"
    )
    try:
        found = violations(probe, set())
    finally:
        probe.unlink()
    assert len(found) == 4, found
    assert any("_PRECISION_INPUT" in v for v in found) and any("overrides Lightning's _save_checkpoint" in v for v in found)
    assert any("self._last_global_step_saved" in v for v in found) and any("._checkpoint_connector" in v for v in found)
