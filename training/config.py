"""Typed stage arguments: a YAML recipe, then `--key value` overrides, into frozen dataclasses.

One reader for every stage keeps the command lines alike:
`python -m training.stage2_instruct --config training/recipes/tiny/stage2.yaml --max_steps 10 --lora.r 4`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or an override that does not fit the stage's arguments."""


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Turn a YAML or command-line value into the field's declared type (no silent guessing)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, prefix=f"{name}.")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], name) for v in value) if origin is tuple else list(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {args}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from e
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are an error, not ignored."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from e


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        node = tree.get(p)
        if not isinstance(node, dict):
            node = {} if node is None else dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node
            tree[p] = node
        tree = node
    tree[parts[-1]] = value


def _field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment after each field in the dataclass's source: the help text of its option."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M)
    return {name: text.strip() for name, text in found}


def help_text(cls: type, recipe: dict[str, Any], prefix: str = "") -> str:
    """One line per option: `--name TYPE = value` (the recipe's, else the default), and its comment."""
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            sub = hint if dataclasses.is_dataclass(hint) else inner[0]
            lines.append(help_text(sub, recipe.get(f.name) or {}, prefix + f.name + "."))
            continue
        if f.name in recipe:
            value = f"{recipe[f.name]!r} (recipe)"
        elif f.default is not dataclasses.MISSING:
            value = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = repr(f.default_factory())
        else:
            value = "required"
        type_name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        lines.append(f"  --{prefix}{f.name} {type_name} = {value}" + (f"\n      {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """Read `--config recipe.yaml` then `--key value` / `--key=value` overrides (dotted for nested).

    `--help` (or `-h`) prints every option with its type, its value (the recipe's when `--config`
    is given first, else the default) and its comment, then exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        recipe = load_yaml(Path(argv[argv.index("--config") + 1])) if "--config" in argv[:-1] else {}
        main = sys.modules["__main__"]
        doc = (main.__doc__ or cls.__doc__ or "").strip()
        spec = getattr(main, "__spec__", None)
        usage = f"python -m {spec.name if spec else cls.__module__} [--config recipe.yaml] [--key value ...]"
        print(f"{doc}\n\nusage: {usage}\n\noptions ({cls.__name__}):\n{help_text(cls, recipe)}")
        raise SystemExit(0)
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options are --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            tree.update(load_yaml(Path(value)))
        else:
            overrides.append((key, yaml.safe_load(value) if value != "" else ""))
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def load_yaml(path: Path) -> dict[str, Any]:
    """A recipe file as a mapping, with a clear error when it is missing or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-able data (for provenance and checkpoints)."""
    return dataclasses.asdict(cfg)
