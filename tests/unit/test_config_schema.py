"""Each config key's type and default are written once: in the dataclass Hydra composes onto (config/schema.py and
the classes it names), which is also the run plan's piece for that concern. The schema and the plan are walked
through their type hints; a key written a second time (a plan class copying a config node, the same field and
default in two classes, a subclass repeating its parent's, a shipped YAML repeating the dataclass) fails here."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from ov_train.config import schema
from ov_train.config.run_plan import RunPlan
from ov_train.resources import CONF_DIR

NONE = object()  # a field without a default


def _reached(root: type, seen: set[type] | None = None) -> set[type]:
    """Every dataclass `root`'s fields hold, through Optional, lists, dicts and tuples."""
    seen = set() if seen is None else seen
    if root in seen:
        return seen
    seen.add(root)
    pending = list(typing.get_type_hints(root).values())
    while pending:
        hint = pending.pop()
        pending += typing.get_args(hint)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _reached(hint, seen)
    return seen


CONFIG = _reached(schema.Config)
for _options in schema.GROUP_SCHEMAS.values():
    for _kind in _options.values():
        CONFIG |= _reached(_kind)
PLAN = _reached(RunPlan) - CONFIG


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return NONE if field.default is MISSING else field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return NONE


def _written(value) -> bool:
    """A default that says something (None means "unset" in too many unrelated keys to compare)."""
    return value is not NONE and value is not None


def _value(field: dataclasses.Field):
    value = _default(field)
    return list(value) if isinstance(value, tuple) else value  # a plan's tuple for a config's list


def mirrors(plan: set[type], config: set[type]) -> list[str]:
    """A plan class that copies a config class, repeats one of its defaults, or, sharing more than one key with it
    (the same concern), gives a shared key a default of its own where the config has one (a second default)."""
    found = []
    for piece in sorted(plan, key=lambda c: c.__name__):
        own = {f.name: f for f in dataclasses.fields(piece)}
        for node in sorted(config, key=lambda c: c.__name__):
            keys = {f.name: f for f in dataclasses.fields(node)}
            if len(keys) > 1 and set(keys) <= set(own):
                found.append(f"{piece.__name__} copies every key of {node.__name__} ({sorted(keys)})")
                continue
            shared = sorted(set(keys) & set(own))
            for name in shared:
                value, theirs = _value(own[name]), _value(keys[name])
                if _written(value) and value == theirs:
                    found.append(f"{piece.__name__}.{name} repeats {node.__name__}.{name}'s default {value!r}")
                elif _written(value) and _written(theirs) and len(shared) > 1:
                    found.append(f"{piece.__name__}.{name} defaults to {value!r}, {node.__name__}.{name} to {theirs!r}")
    return found


def _declared_in(kind: type, name: str) -> type:
    return next(c for c in kind.__mro__ if name in c.__dict__.get("__annotations__", {}))


def twice_in_config(config: set[type]) -> list[str]:
    """The same key and default in two config classes that do not inherit one from the other, or a subclass that
    declares its parent's field again with the parent's default."""
    found = []
    ordered = sorted(config, key=lambda c: c.__name__)
    for i, a in enumerate(ordered):
        declared = set(a.__dict__.get("__annotations__", {}))
        for parent in a.__mro__[1:]:
            if dataclasses.is_dataclass(parent):
                inherited = {f.name: f for f in dataclasses.fields(parent)}
                for name in sorted(declared & set(inherited)):
                    if _default(a.__dataclass_fields__[name]) == _default(inherited[name]):
                        found.append(f"{a.__name__}.{name} declares {parent.__name__}.{name} again")
                break
        for b in ordered[i + 1:]:
            if issubclass(a, b) or issubclass(b, a):
                continue
            fa, fb = {f.name: f for f in dataclasses.fields(a)}, {f.name: f for f in dataclasses.fields(b)}
            for name in sorted(set(fa) & set(fb)):
                if _declared_in(a, name) is _declared_in(b, name):
                    continue  # one field both inherit
                value = _default(fa[name])
                if _written(value) and not isinstance(value, bool) and value == _default(fb[name]):
                    found.append(f"{a.__name__}.{name} and {b.__name__}.{name} both default to {value!r}")
    return found


# The shipped files that are one group option (or a shared file merged into one), and the class they fill.
ROOT_TYPES = typing.get_type_hints(schema.Config)
SHARED = {"stage_media": schema.StageConfig, "stage_full_model": schema.StageConfig,
          "model_onevision": schema.ModelConfig, "adapter_lora": schema.LoraConfig}


def _option_class(path: Path, node, conf_dir: Path) -> type | None:
    group = path.parent.name
    if path.parent == conf_dir:
        return schema.Config
    if group == "shared":
        return SHARED.get(path.stem)
    if group not in ROOT_TYPES:
        return None  # experiment/, debug/, hydra/: they override other options, not the schema
    for entry in node.get("defaults", []):
        for options in schema.GROUP_SCHEMAS.values():
            if isinstance(entry, str) and entry in options:
                return options[entry]
    return ROOT_TYPES[group]


def _repeats(node, kind: type, where: str) -> list[str]:
    found = []
    fields = {f.name: f for f in dataclasses.fields(kind)}
    for key, value in node.items():
        if key == "defaults" or key not in fields:
            continue
        hints = typing.get_type_hints(kind)
        inner = [h for h in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(h)]
        if inner and isinstance(value, dict):
            found += _repeats(value, inner[0], f"{where}{key}.")
        elif not (isinstance(value, str) and "${" in value) and _default(fields[key]) is not NONE \
                and value == _default(fields[key]) and type(value) is not dict:
            found.append(f"{where}{key}: {value!r} is {kind.__name__}.{key}'s default already")
    return found


def yaml_repeats(conf_dir: Path = CONF_DIR) -> list[str]:
    found = []
    for path in sorted(conf_dir.rglob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        kind = _option_class(path, node, conf_dir) if isinstance(node, dict) else None
        if kind is not None:
            found += _repeats(node, kind, f"{path.relative_to(conf_dir)}: ")
    return found


def test_no_plan_class_mirrors_a_config_class():
    assert not mirrors(PLAN, CONFIG), "\n".join(mirrors(PLAN, CONFIG))


def test_no_key_is_defined_twice_in_the_schema():
    assert not twice_in_config(CONFIG), "\n".join(twice_in_config(CONFIG))


def test_no_shipped_yaml_repeats_a_schema_default():
    assert not yaml_repeats(), "\n".join(yaml_repeats())


def test_the_walks_find_what_they_look_for(tmp_path):
    """The three finders see a planted duplicate of each kind (so a pass above is not an empty walk)."""

    @dataclasses.dataclass
    class Node:
        every: int = 5
        keep: int = 0

    @dataclasses.dataclass
    class Copy:
        every: int = 5
        keep: int = 0
        extra: str = "x"

    @dataclasses.dataclass
    class Sub(Node):
        every: int = 5

    @dataclasses.dataclass
    class Model:
        rows: int = 8
        loss: str = "chunked"
        hooks: list = dataclasses.field(default_factory=list)
        name: str = MISSING

    @dataclasses.dataclass
    class Forward:
        rows: int = 8
        loss: str = "full"
        hooks: tuple = ()

    assert mirrors({Copy}, {Node}) == ["Copy copies every key of Node (['every', 'keep'])"]
    assert mirrors({Forward}, {Model}) == ["Forward.hooks repeats Model.hooks's default []",
                                           "Forward.loss defaults to 'full', Model.loss to 'chunked'",
                                           "Forward.rows repeats Model.rows's default 8"]
    assert "Sub.every declares Node.every again" in twice_in_config({Node, Sub})
    (tmp_path / "config.yaml").write_text("seed: 0\ncheckpoint:\n  keep: 0\n")
    assert yaml_repeats(tmp_path) == ["config.yaml: seed: 0 is Config.seed's default already",
                                      "config.yaml: checkpoint.keep: 0 is CheckpointConfig.keep's default already"]
    assert len(CONFIG) > 20 and len(PLAN) > 5
