"""Typed configuration from YAML: dataclass schemas, line-aware validation, includes and overrides.

Generic (knows nothing of world models) so that the toolkit's ``debug:`` section and any
user's own config are validated the same way: unknown keys get a "did you mean", wrong
types and out-of-range values name the file, the key path and the line.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "Source",
    "field",
    "read_yaml",
    "from_dict",
    "to_dict",
    "parse_override",
    "apply_override",
    "describe",
]


class ConfigError(ValueError):
    """A configuration problem, with the file, key path and line where it was found."""

    def __init__(self, message: str, *, file: str | None = None, path: str = "", line: int | None = None):
        self.file, self.path, self.line, self.detail = file, path, line, message
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        key = f" {path}:" if path else ""
        super().__init__(f"{where}:{key} {message}")


def field(default: Any = dataclasses.MISSING, *, help: str = "", min: float | None = None,
          max: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying a one-line help text and an optional inclusive range."""
    meta = {"help": help, "min": min, "max": max}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Source:
    """Where each key path of a merged YAML document came from: (file, line)."""

    def __init__(self, default_file: str | None = None):
        self.default_file = default_file
        self.lines: dict[str, tuple[str | None, int | None]] = {}

    def of(self, path: str) -> tuple[str | None, int | None]:
        """The (file, line) of ``path`` or of its nearest known parent."""
        p = path
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return self.default_file, None
            p = p.rpartition(".")[0]

    def error(self, path: str, message: str) -> ConfigError:
        file, line = self.of(path)
        return ConfigError(message, file=file, path=path, line=line)


def _record_lines(node: yaml.Node, prefix: str, file: str, source: Source) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            source.lines[path] = (file, key_node.start_mark.line + 1)
            _record_lines(value_node, path, file, source)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike, source: Source | None = None, *, _seen: tuple = ()) -> tuple[dict, Source]:
    """Read a YAML mapping with ``yaml.safe_load``, resolving ``include:`` (a path or list of paths)."""
    path = os.fspath(path)
    source = source or Source(path)
    if source.default_file is None:
        source.default_file = path
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"include cycle through {path}", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=path) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"YAML syntax error: {problem}", file=path,
                          line=mark.line + 1 if mark else None) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}", file=path)
    includes = data.pop("include", None)
    merged: dict = {}
    if includes is not None:
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise ConfigError("include must be a file path or a list of file paths", file=path, path="include")
        for inc in includes:
            inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
            base, _ = read_yaml(inc_path, source, _seen=_seen + (real,))
            merged = _deep_merge(merged, base)
    if node is not None:
        _record_lines(node, "", path, source)
    return _deep_merge(merged, data), source


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, source: Source, meta: dict | None = None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise source.error(path, f"expected a mapping, got {value!r}")
        return _build(tp, value, path, source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices if c == value):
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise source.error(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, source, meta)
            except ConfigError as e:
                errors.append(e)
        raise source.error(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise source.error(path, f"expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, arg, f"{path}[{i}]", source, meta) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise source.error(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise source.error(path, f"expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise source.error(path, f"expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise source.error(path, f"expected a string, got {value!r}")
        return value
    else:
        raise TypeError(f"unsupported schema type {tp!r} at {path}")
    meta = meta or {}
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise source.error(path, f"must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise source.error(path, f"must be <= {hi}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str, source: Source) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            valid = ", ".join(fields)
            raise source.error(path, f"unknown key{extra}; valid keys here: {valid}")
        f = fields[key]
        kwargs[key] = _convert(value, hints[key], path, source, dict(f.metadata))
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise source.error(prefix, str(e)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except ValueError as e:
            raise source.error(prefix, str(e)) from None
    return obj


def from_dict(cls: type[T], data: dict | None, *, source: Source | None = None, prefix: str = "") -> T:
    """Validate ``data`` into the dataclass ``cls``; raises ConfigError naming key path and line."""
    source = source or Source()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise source.error(prefix, f"expected a mapping, got {data!r}")
    return _build(cls, data, prefix, source)


def to_dict(obj: Any) -> Any:
    """A plain-data (YAML-safe) copy of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=c`` into ("a.b", value) with the value read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value", path=key)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict, key: str, value: Any, source: Source | None = None) -> None:
    """Set ``data[a][b] = value`` for key ``a.b``, creating sections as needed; marks the source."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section", path=key)
        node = nxt
    node[parts[-1]] = value
    if source is not None:
        source.lines[key] = ("--set", None)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key path, type, default, help) for every leaf field: used by ``config show --help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, path))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append((path, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
