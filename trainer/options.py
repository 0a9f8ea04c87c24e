"""Declarative options: one dataclass per step, turned into argparse flags and read from TOML.

Precedence: the field's default < top-level keys of the ``--config`` TOML file <
the file's ``[fit]`` / ``[export]`` / ``[quantize]`` / ``[publish]`` table < flags.
Keys use the flag's name with ``_`` or ``-`` (``nproc_per_node`` or ``nproc-per-node``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tensorwire.trainer.errors import TrainerError

KINDS = ("str", "int", "float", "bool", "ints", "strs", "kv")


def opt(
    default: Any,
    help: str,
    *,
    kind: str = "str",
    choices: Iterable[str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option."""
    assert kind in KINDS
    meta = {"help": help, "kind": kind, "choices": tuple(choices) if choices else None, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_kv(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise TrainerError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _convert(kind: str, value: Any, where: str) -> Any:
    """Check and normalize a value from TOML or a flag for a field of ``kind``."""
    if kind in ("ints", "strs") and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    try:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "int" and isinstance(value, str):
            return int(value)
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "float" and isinstance(value, str):
            return float(value)
        if kind == "str" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        if kind == "ints" and isinstance(value, list):
            return [int(v) for v in value]
        if kind == "strs" and isinstance(value, list):
            return [str(v) for v in value]
        if kind == "kv" and isinstance(value, dict):
            return dict(value)
        if kind == "kv" and isinstance(value, list):
            return _parse_kv([str(v) for v in value])
    except ValueError:
        pass
    expected = {
        "ints": "a list of integers",
        "strs": "a list of strings",
        "kv": "a table of KEY = VALUE",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
    }[kind]
    raise TrainerError(f"{where}: expected {expected}, got {value!r}")


def add_options(parser: argparse.ArgumentParser, classes: Iterable[type], exclude: Iterable[str] = ()) -> None:
    """Flags for every field of ``classes`` (a name shared by two classes becomes one flag), one group per
    class; the fields a class inherits from another options dataclass come last, in that class's group."""
    seen: set[str] = set(exclude)
    inherited = [base for cls in classes for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)]
    shared = {f.name for base in inherited for f in dataclasses.fields(base)}
    own = [(cls, [f for f in dataclasses.fields(cls) if f.name not in shared]) for cls in classes]
    groups = own + [(base, list(dataclasses.fields(base))) for base in dict.fromkeys(inherited)]
    for cls, cls_fields in groups:
        group = parser.add_argument_group(f"{cls.__name__.removesuffix('Options').lower()} options")
        for f in cls_fields:
            if f.name in seen:
                continue
            seen.add(f.name)
            meta = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            hidden = default in (None, [], {}, "") or "default" in meta["help"]
            shown = "" if hidden else f" (default: {_show(default)})"
            common = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
            if meta["kind"] == "bool":
                group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **common)
            elif meta["kind"] == "kv":
                group.add_argument(_flag(f.name.removesuffix("s")), action="append", metavar="KEY=VALUE", **common)
            else:
                group.add_argument(_flag(f.name), choices=meta["choices"], metavar=meta["metavar"], **common)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def read_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainerError(f"{file}: no such config file") from None
    except tomllib.TOMLDecodeError as err:
        raise TrainerError(f"{file}: not valid TOML: {err}") from None


def check_config_keys(data: dict[str, Any], source: str, sections: dict[str, Iterable[type]]) -> None:
    """Reject keys that no step knows, naming the file and key (typos must not pass silently)."""
    known_all = {f.name for classes in sections.values() for cls in classes for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            known = {f.name for cls in sections[key] for f in dataclasses.fields(cls)}
            for sub in value:
                if sub.replace("-", "_") not in known:
                    raise TrainerError(f"{source}: unknown key '{key}.{sub}' (check its spelling and section)")
        elif key.replace("-", "_") not in known_all:
            raise TrainerError(f"{source}: unknown key {key!r} (check its spelling, or put it in a [section])")


def resolve(
    cls: type, section: str, config: dict[str, Any], flags: dict[str, Any], source: str
) -> tuple[Any, set[str]]:
    """Build ``cls`` from defaults, the TOML file and flags; also return the names set explicitly."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    table = config.get(section) if isinstance(config.get(section), dict) else {}
    for layer, where in ((config, source), (table, f"{source} [{section}]")):
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in fields or (isinstance(value, dict) and fields[name].metadata["kind"] != "kv"):
                continue
            values[name] = _convert(fields[name].metadata["kind"], value, f"{where}: {key}")
    for name, value in flags.items():
        if name in fields:
            values[name] = _convert(fields[name].metadata["kind"], value, _flag(name))
    return cls(**values), set(values)
