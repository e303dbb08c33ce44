"""A hint for a mistyped key on the command line: Hydra's own message names the key that is not in the schema
(and suggests appending it with `+`, which for a typo only moves the error); this adds the keys it may have meant."""
from __future__ import annotations

import dataclasses
import difflib
import typing

from ov_train.config.schema import Config


def _fields(cls: type) -> dict[str, type]:
    """A schema class's fields and their types, over the class and its subclasses (a group's options add keys)."""
    out: dict[str, type] = {}
    for klass in (cls, *_subclasses(cls)):
        for name, hint in typing.get_type_hints(klass).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            out.setdefault(name, args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint)
    return out


def _subclasses(cls: type) -> list[type]:
    return [s for sub in cls.__subclasses__() for s in (sub, *_subclasses(sub))]


def unknown_key_hint(overrides: list[str]) -> str | None:
    """For the first `a.b.c=value` override whose key the schema does not hold, the keys it may have meant."""
    for arg in overrides:
        key, eq, _ = arg.partition("=")
        if not eq or key.startswith(("+", "~", "-", "hydra.")) or "/" in key:
            continue
        cls, path = Config, []
        for part in key.split("."):
            fields = _fields(cls)
            if part not in fields:
                where = ".".join(path)
                close = difflib.get_close_matches(part, fields, n=3)
                meant = f"did you mean {', '.join(f'{where}.{c}'.lstrip('.') for c in close)}? " if close else ""
                return f"{key}: no such key; {meant}keys of {where or 'the config'}: {', '.join(sorted(fields))}"
            path.append(part)
            cls = fields[part]
            if not dataclasses.is_dataclass(cls):
                break
    return None
