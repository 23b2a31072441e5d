"""The machinery of every settings dataclass: type coercion, ``from_dict``, the ``_Validated`` mixin, YAML files and
``key=value`` overrides.

Why apart from ``brts.shared.config``: that module holds the settings themselves (what each command accepts and
its rules); this one how any of them is read, checked and written, which changes for other reasons. Everything
here is re-exported by ``brts.shared.config``, the one place callers import from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing ints to floats and lists to tuples)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(path, errors[0].split(": ", 1)[1] if errors else f"invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(path, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is tuple:
        if value is None:  # YAML's empty value (``key:``), and configs saved when a field was ``str | None``
            value = []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(path, f"must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        return _coerce_map(value, typing.get_args(tp)[1], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            _fail(path, f"must be a mapping of {tp.__name__} settings, got {value!r}")
        try:
            return from_dict(tp, value, path)
        except ConfigError as exc:  # the section's own rules name "sampling.x": say where it sits (train.sampling.x)
            section, message = getattr(tp, "SECTION", ""), str(exc)
            if section and path != section and message.startswith(f"{section}."):
                raise ConfigError(path + message[len(section):]) from None
            raise
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return value
    return value


def _coerce_map(value: Any, item_tp: Any, path: str) -> dict[str, Any]:
    """A mapping of names to settings (``teachers: {a: {...}}``); each entry checked under ``path.NAME``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(path, f"must be a mapping of names to settings, got {value!r}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key.strip():
            _fail(path, f"names must be non-empty strings, got {key!r}")
        out[key] = _coerce(item, item_tp, f"{path}.{key}")
    return out


C = TypeVar("C")


def from_dict(cls: type[C], data: Mapping[str, Any], path: str | None = None) -> C:
    """Build ``cls`` from a mapping, rejecting unknown keys with the list of known ones."""
    prefix = path or getattr(cls, "SECTION", cls.__name__)
    if not isinstance(data, Mapping):
        _fail(prefix, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        _fail(f"{prefix}.{unknown[0]}", f"unknown setting; known settings: {', '.join(names)}")
    kwargs = {key: _coerce(value, hints[key], f"{prefix}.{key}") for key, value in data.items()}
    return cls(**kwargs)


class _Validated:
    """Mixin: type-check every field, then run the class's own ``check``, on construction."""

    SECTION = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], f"{self.SECTION}.{f.name}"))
        self.check()

    def check(self) -> None:
        """Cross-field and range rules; raise ConfigError through ``self.fail``."""

    def fail(self, name: str, message: str) -> None:
        _fail(f"{self.SECTION}.{name}", message)

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.fail(name, f"{message}, got {getattr(self, name.split('.')[0])!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-5", "prompt.max_prompt_len=512"]`` → a nested dict; values parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=1e-5 or prompt.max_prompt_len=512")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc.__class__.__name__}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is a value, not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_config_file(p: Path) -> dict[str, Any]:
    """A YAML file's mapping of settings; ConfigError naming the file (and the line) for anything else."""
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p}: cannot be read ({exc.__class__.__name__}: {exc})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), **values: Any) -> C:
    """Build ``cls`` from a YAML file (optional), then keyword ``values``, then ``key=value`` overrides (last wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p}: does not exist")
        data = read_config_file(p)
    data = _merge(data, {k: v for k, v in values.items() if v is not None})
    data = _merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config back as YAML (the trainer stores it beside every checkpoint)."""
    Path(path).write_text(yaml.safe_dump(_plain(dataclasses.asdict(config)), sort_keys=False), encoding="utf-8")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
