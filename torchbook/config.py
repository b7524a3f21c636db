"""Configs: dataclasses with the book's defaults, named presets, `key=value` overrides and JSON round-trips.

Every recipe's config is a dataclass. Its class attribute `PRESETS` maps a preset name (`smoke`, `quick`,
`book`, ...) to the field values that preset overrides. Values given on the command line as `key=value` strings
are parsed according to the field's type, so `lr=0.01 epochs=3 hidden=[300,100]` all work.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from torchbook.errors import UserInputError, closest_first, unknown

C = TypeVar("C")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every dataclass field of `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe_type(tp: Any) -> str:
    """A short human description of a field type, for error messages."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def parse_value(text: str, tp: Any, key: str = "value") -> Any:
    """Parse a command-line string into a value of type `tp`; raise UserInputError saying what is accepted."""
    origin = get_origin(tp)
    try:
        if origin in (Union, types.UnionType):
            args = get_args(tp)
            if type(None) in args and text.lower() in ("none", "null", ""):
                return None
            errors = []
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return parse_value(text, arg, key)
                except UserInputError as e:
                    errors.append(str(e))
            raise ValueError
        if origin is Literal:
            choices = get_args(tp)
            for choice in choices:
                if str(choice) == text:
                    return choice
            raise UserInputError(
                f"{key}={text!r} is not accepted; accepted: {', '.join(closest_first(text, map(str, choices)))}"
            )
        if origin in (list, tuple):
            (inner, *_) = get_args(tp) or (str,)
            body = text.strip()
            if body.startswith("["):
                items = json.loads(body)
                if not isinstance(items, list):
                    raise ValueError
                items = [str(x) for x in items]
            else:
                items = [x for x in body.split(",") if x.strip()]
            values = [parse_value(str(x).strip(), inner, key) for x in items]
            return values if origin is list else tuple(values)
        if tp is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            as_float = float(text)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if tp is Path:
            return Path(text)
        if tp is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except UserInputError:
        raise
    except (ValueError, json.JSONDecodeError):
        pass
    raise UserInputError(f"{key}={text!r} is not {describe_type(tp)}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a JSON value read from a config file against the field type."""
    if isinstance(value, str) and tp is not str and get_origin(tp) is not Literal:
        return parse_value(value, tp, key)
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            return parse_value(str(value), tp, key)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin in (list, tuple) and isinstance(value, list):
        (inner, *_) = get_args(tp) or (Any,)
        items = [coerce(v, inner, key) if inner is not Any else v for v in value]
        return items if origin is list else tuple(items)
    simple = {int: int, float: float, bool: bool, str: str}
    if tp in simple and not isinstance(value, simple[tp]) or (tp is int and isinstance(value, bool)):
        raise UserInputError(f"{key}={value!r} is not {describe_type(tp)}")
    return value


def presets_of(cls: type) -> dict[str, dict[str, Any]]:
    return dict(getattr(cls, "PRESETS", {}))


def field_help(cls: type) -> dict[str, str]:
    """Each field's help: the comment on its line in the class body (`lr: float = 1e-3  # ...`), inherited
    fields included (the nearest class's comment wins). Comments are the documentation of a config."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "builtins":
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        for line in lines:
            match = re.match(r"^\s{4}(\w+)\s*:[^#]*#\s*(.+)$", line)
            if match:
                helps[match.group(1)] = match.group(2).strip()
    return helps


def describe_config(cls: type) -> str:
    """A config's keys (type, default, help) and presets, for `torchbook run RECIPE --help`."""
    defaults = cls()  # type: ignore[call-arg]
    helps = field_help(cls)
    types_ = field_types(cls)
    rows = [(f.name, describe_type(types_[f.name]), repr(getattr(defaults, f.name)), helps.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    out = ["config keys (give them as key=value; type, default, what it does):"]
    out += [f"  {n:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {h}".rstrip() for n, t, d, h in rows]
    presets = presets_of(cls)
    out.append("presets (--preset NAME):" if presets else "presets: none")
    for name, values in presets.items():
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the defaults"
        out.append(f"  {name}: {shown}")
    return "\n".join(out)


def split_override(item: str, types_: dict[str, Any], expected: str = "key=value") -> tuple[str, str]:
    """`"hidden-size=3"` -> `("hidden_size", "3")`, with a clear error for a missing `=` or an unknown key."""
    if "=" not in item:
        raise UserInputError(f"expected {expected}, got {item!r}; accepted keys: {', '.join(sorted(types_))}")
    key, text = item.split("=", 1)
    key = key.strip().replace("-", "_")
    if key not in types_:
        raise unknown("config key", key, types_)
    return key, text


def build_config(
    cls: type[C],
    preset: str | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> C:
    """Defaults, then `base` (a config file's values), then the preset, then `key=value` overrides."""
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    if base:
        for key, value in base.items():
            if key not in types_:
                raise unknown(f"config key in file for {cls.__qualname__}:", key, types_)
            values[key] = coerce(value, types_[key], key)
    if preset is not None:
        presets = presets_of(cls)
        if preset not in presets:
            raise unknown("preset", preset, presets)
        values.update(presets[preset])
    for item in overrides or []:
        key, text = split_override(item, types_)
        values[key] = parse_value(text, types_[key], key)
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{key}={value} is not a finite number; give a finite value", param=key)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a `config.json` written by a run (replayable with `--config`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise UserInputError(f"config file {str(path)!r} does not exist; give a config.json written by a run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"config file {str(path)!r} is not text (not UTF-8); give a config.json written by a "
                             "run") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"config file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"config file {str(path)!r} must hold a JSON object of key: value")
    data.pop("recipe", None)
    return data.get("config", data) if isinstance(data.get("config"), dict) else data
