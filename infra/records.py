"""One rule for reading a typed record (a dataclass) from parsed JSON or YAML, used by every file
format the stages hand each other: the run config (`train.config`), a bundle's manifest
(`predict.manifest`) and `metrics.jsonl`'s epoch records (`infra.history`).

- the values are a mapping; every key is a field (an unknown key is refused, naming the valid
  ones), and every field without a default is there;
- every value has its field's type: `int` (not a bool), `float` (an int is taken as one), `bool`,
  `str`, a `Literal` of choices, `X | None`, a nested record (read by the same rule), and
  `dict[str, T]` / `list[T]` checked element by element (bare `dict` and `list` hold anything);
- what a type cannot say (ranges, how fields relate) is each format's own check, after this.

A refusal is a `RecordError` whose message names the dotted key and the value; each format's
reader adds the file. Needs only the standard library (predict is torch-free).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Literal


class RecordError(ValueError):
    """A value that does not fit its record's schema; the message names the key."""


def from_dict(cls, values, *, what: str = "", where: str = "", numbers_from_strings: bool = False):
    """An instance of dataclass `cls` from `values`, checked by the rule above. `what` names the
    record in messages ("config", "manifest"), `where` the dotted key of a nested one.
    `numbers_from_strings`: a float field also takes a string such as "3e-4" (YAML 1.1, which
    PyYAML speaks, reads a number without a dot as a string)."""
    if not isinstance(values, dict):
        raise RecordError(f"{where or 'the ' + (what or 'record')}={_shown(values)}: expected a mapping of its keys "
                          f"({', '.join(f.name for f in dataclasses.fields(cls))})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise RecordError(f"unknown {what + ' ' if what else ''}key {_key(where, unknown[0])}; valid keys"
                          f"{' under ' + where if where else ''}: {', '.join(sorted(fields))}")
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"no {_key(where, name)}: every {what or 'record'} has one")
    kwargs = {name: _value(value, hints[name], _key(where, name), what, numbers_from_strings)
              for name, value in values.items()}
    return cls(**kwargs)


def _key(where: str, name) -> str:
    return f"{where}.{name}" if where else str(name)


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# a number as YAML 1.2 writes it (with or without a dot or an exponent)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _value(value, hint, key: str, what: str, numbers_from_strings: bool):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, what=what, where=key, numbers_from_strings=numbers_from_strings)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        origin = typing.get_origin(kind)
        if origin is Literal:
            if isinstance(value, str) and value in typing.get_args(kind):
                return value
        elif kind is bool or isinstance(value, bool):
            if kind is bool and isinstance(value, bool):
                return value  # a bool is an int to Python, never to a record
        elif kind is int and isinstance(value, int):
            return value
        elif kind is float and isinstance(value, (int, float)):
            return float(value)
        elif kind is float and numbers_from_strings and isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
        elif kind is str and isinstance(value, str):
            return value
        elif kind in (dict, list) and isinstance(value, kind):
            return value
        elif origin is dict and isinstance(value, dict):
            key_type, item_type = typing.get_args(kind)
            for k in value:
                if not isinstance(k, key_type):
                    raise RecordError(f"{key}: key {_shown(k)} is not a {type_name(key_type)}")
            return {k: _value(v, item_type, _key(key, k), what, numbers_from_strings) for k, v in value.items()}
        elif origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(kind)
            return [_value(v, item_type, f"{key}[{i}]", what, numbers_from_strings) for i, v in enumerate(value)]
    raise RecordError(f"{key}={_shown(value)}: expected {type_name(hint)}")


def type_name(kind) -> str:
    """A field's type in words, as messages and the config reference (`make docs`) say it."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(k) for k in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(typing.get_args(kind))
    if origin is dict:
        return "a mapping of " + " to ".join(type_name(k) for k in typing.get_args(kind))
    if origin is list:
        return "a list of " + type_name(typing.get_args(kind)[0])
    if kind is type(None):
        return "null"
    return {dict: "a mapping", list: "a list"}.get(kind, kind.__name__)
