"""Config files and JSON round trips: `TrainConfig` (or any config dataclass) to and from dicts,
config.json, and TOML/YAML/JSON override files.

`config_from_dict` type-checks every value against the field's annotation and re-runs the
dataclasses' `__post_init__` checks, so a bad file fails with the same one-line `ConfigError`
as a bad flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from soar_fast.config.errors import ConfigError
from soar_fast.config.train import TrainConfig, _int

__all__ = [
    "config_from_dict", "config_to_dict", "load_config_file", "load_config_json", "save_config_json",
]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain JSON-able dicts."""
    return dataclasses.asdict(cfg)


def save_config_json(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def load_config_json(path: str | Path) -> TrainConfig:
    """Read a config.json written by `save_config_json`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}; pass a run folder written by `soar-fast train`") from None
    return config_from_dict(TrainConfig(), data, where=str(path))


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Apply a TOML (.toml) or YAML (.yaml/.yml) file of overrides on `base` (default TrainConfig())."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with an existing .toml/.yaml file")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml  # lazy: PyYAML is optional

            data = yaml.safe_load(path.read_text()) or {}
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path} has an unknown suffix; use .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except ImportError:
        raise ConfigError("reading YAML needs PyYAML; `pip install pyyaml` or use a .toml file") from None
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path} does not parse ({msg}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/mapping of sections")
    return config_from_dict(base if base is not None else TrainConfig(), data, where=str(path))


def config_from_dict(base: Any, data: dict[str, Any], where: str = "config") -> Any:
    """Override the dataclass `base` with nested dict `data`, type-checking every value."""
    return _merge(base, data, where, prefix="")


def _merge(base: Any, data: dict[str, Any], where: str, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(base)}
    hints = typing.get_type_hints(type(base), include_extras=True)
    updates: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown field '{prefix}{key}'{hint}")
        tp = hints[name]
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{prefix}{name}' is a section; give it a table of fields")
            updates[name] = _merge(current, value, where, prefix=f"{prefix}{name}.")
        else:
            updates[name] = _coerce(value, tp, f"{where}: field '{prefix}{name}'")
    try:
        return dataclasses.replace(base, **updates)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _coerce(value, typing.get_args(tp)[0], where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where} expects {tp}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is invalid: choose one of {', '.join(map(repr, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects true/false, got {value!r}")
        return value
    if tp is int:
        if not _int(value):
            raise ConfigError(f"{where} expects an integer, got {value!r}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return value
    return value
