"""The package's layers flow one way: plan -> model / data -> training -> run and tools. Every import of every
module (function-level ones included) is read with `ast` and checked against the floor plan below."""
from __future__ import annotations

import ast
from pathlib import Path

import ov_train

PACKAGE = Path(ov_train.__file__).resolve().parent

# Lowest first; a module may import its own floor and the floors below it, never one above. checkpoints/ spans
# floors: its path rules are the plan's, reading and exporting the model's, saving during a fit training's.
FLOORS = [
    ("ground", ["ov_train.constants", "ov_train.devices", "ov_train.resources", "ov_train.utils"]),
    ("plan", ["ov_train.config", "ov_train.checkpoints.paths"]),
    ("vision and text", ["ov_train.vision", "ov_train.text"]),
    ("model and data", ["ov_train.model", "ov_train.data", "ov_train.parallel", "ov_train.checkpoints.safe_load",
                        "ov_train.checkpoints.reading", "ov_train.checkpoints.adapters", "ov_train.checkpoints.export"]),
    ("training and evaluation", ["ov_train.training", "ov_train.strategies", "ov_train.eval", "ov_train.checkpoints"]),
    ("run and tools", ["ov_train.run", "ov_train.cli", "ov_train.bench", "ov_train.planner"]),
]
# Packages of one floor that must not know each other: nothing in model/ (or parallel/) knows about shards, nor data/
# about models.
STRANGERS = [("ov_train.model", "ov_train.data"), ("ov_train.parallel", "ov_train.data"),
             ("ov_train.checkpoints", "ov_train.data")]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every ov_train module `name` imports, wherever in the file the import statement is."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {m for m in found if m == "ov_train" or m.startswith("ov_train.")}


def _owner(module: str) -> tuple[int, str] | None:
    for floor, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return floor, prefix
    return None


def test_every_module_has_a_floor():
    homeless = sorted(m for m in _modules() if m != "ov_train" and _owner(m) is None)
    assert not homeless, f"modules on no floor of tests/unit/test_layers.py: {homeless}"


def test_no_module_imports_a_higher_floor_or_a_stranger():
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        if name == "ov_train":
            continue
        floor, home = _owner(name)
        targets = {t if t in modules else t.rpartition(".")[0] for t in _imports(name, path)} & modules.keys()
        for target in sorted(targets - {"ov_train"}):
            owner = _owner(target)
            if owner[0] > floor:
                wrong.append(f"{name} ({FLOORS[floor][0]}) imports {target} ({FLOORS[owner[0]][0]})")
            elif {home, owner[1]} in [set(pair) for pair in STRANGERS]:
                wrong.append(f"{name} imports {target}: {home} and {owner[1]} must not know each other")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t if t in modules else t.rpartition(".")[0] for t in _imports(name, path)} & modules.keys() - {name}
             for name, path in modules.items()}
    # Packages' __init__ files import nothing here; a cycle is a path from a module back to itself.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from ov_train.run import train\nfrom . import sibling\n")
    assert _imports("ov_train.model.mod", source) == {"ov_train.run", "ov_train.run.train", "ov_train.model",
                                                      "ov_train.model.sibling"}
