"""Typed config objects from layers of plain values: coercion, the key check and validation, in one place.

Used by the resolver for every stage's params, and wherever a config arrives inside a file (a blob
header's model config), so a foreign or hand-edited value meets the same rules as a command-line one.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Any

from pgolf.config.sections import ConfigError, Section
from pgolf.errors import PgolfError


def coerce(value: Any, typ: Any, where: str) -> Any:
    """`value` as `typ` (bool, int, float, str), accepting the spellings YAML and a shell produce."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise PgolfError(f"{where}: expected {typ.__name__}, got {value!r}")


def build(cls: type[Section], layers: list[tuple[dict[str, Any], str]], section: str = "") -> tuple[Any, dict[str, str]]:
    """(validated `cls` from (values, source) layers, later winning; {key: source of its value})."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    prefix = f"{section}." if section else ""
    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for values, source in layers:
        for key, value in (values or {}).items():
            if key not in names:
                raise PgolfError(f"{source}: unknown key {prefix}{key}; known: {', '.join(sorted(names))}")
            kwargs[key] = coerce(value, hints[key], f"{source}: {prefix}{key}")
            sources[key] = source
    cfg = cls(**kwargs)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise PgolfError(f"{sources.get(exc.key, 'default')}: {prefix}{exc}") from None
    return cfg, sources


# Keys pgolf no longer has, with the value that meant "off": a checkpoint or blob written before their removal
# still loads when it has them off. model.fused_mlp: a Triton LeakyReLU² up-projection that measured slower than
# the compiled plain MLP on an H200 (bench/README.md, issue 16).
RETIRED_KEYS = {"fused_mlp": False}


def build_section(cls: type[Section], values: Any, source: str) -> Any:
    """A config from one mapping (e.g. a blob header's model config), every key checked and validated."""
    if not isinstance(values, dict):
        raise PgolfError(f"{source}: expected a mapping of {cls.__name__} keys, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in values.items() if k in names or k not in RETIRED_KEYS or v != RETIRED_KEYS[k]}
    return build(cls, [(values, source)])[0]
