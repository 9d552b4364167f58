"""Typed config machinery: dataclass fields with docs, YAML values checked against annotations.

Generic: nothing here knows posttrain's sections (each package defines its own, e.g. models/config.py;
train/config.py and eval/config.py compose them into a run's config). Unknown keys are errors naming
the closest valid key; wrong types name the key and the expected type; YAML errors name line and column.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.errors import ConfigError


def opt(default: Any, doc: str) -> Any:
    """A config field with its default and one-line doc (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only safe cases (int->float, '1e-4'->float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return build(tp, value, key + ".")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass  # the next type may take it; if none does, the error below names them all
        raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"config key {key}: {value!r} is not one of {_type_name(tp)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) and args[0] is not dict else value
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is type(None) and value is None:
        return None
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`lora.r=16` -> ("lora.r", 16); values are YAML, so lists and null work: `a.b=[x,y]`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML at {yaml_error_text(err)}") from None


def yaml_error_text(err: yaml.YAMLError) -> str:
    """One line from a PyYAML error: 'line 4 column 15: mapping values are not allowed here' (1-based)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = f"line {mark.line + 1} column {mark.column + 1}: {problem}"
    opened, context = getattr(err, "context_mark", None), getattr(err, "context", None)
    if opened is not None and context:
        text += f" ({context} started at line {opened.line + 1} column {opened.column + 1})"
    return text


def read_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping; a missing file, bad YAML (line, column) or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML at {yaml_error_text(err)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def read_tree(path: str | Path | None, overrides: list[str], extra: dict[str, Any]) -> tuple[dict, Path]:
    """(YAML tree of `path` or {} without one, with dotted `extra` keys then `key=value` overrides applied;
    the folder its relative paths are read from)."""
    tree, base_dir = ({}, Path(".")) if path is None else (read_yaml(path), Path(path).parent)
    for dotted, value in extra.items():
        set_dotted(tree, dotted, value)
    for item in overrides:
        set_dotted(tree, *parse_override(item))
    return tree, base_dir


def beside(path: str, base_dir: Path) -> str:
    """A relative path that exists next to the config file means that file; anything else is kept."""
    if path and not Path(path).is_absolute() and (base_dir / path).exists():
        return str(base_dir / path)
    return path


def save_yaml(tree: dict, path: str | Path) -> None:
    """Write a config tree as YAML, keys in their section order."""
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")


def describe_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf key: the source of `posttrain keys`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.append((prefix + f.name, "[]", f.metadata.get("doc", "")))
            rows.extend(describe_keys(typing.get_args(tp)[0], prefix + f.name + "[]."))
            continue
        rows.append((prefix + f.name, repr(default), f.metadata.get("doc", "")))
    return rows
