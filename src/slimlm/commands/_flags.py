"""Command-line flags derived from config dataclasses, so the CLI, YAML recipes and the docstrings
share one source and cannot drift.

Each field declared with `core.config.field(default, help)` becomes `--field-name`; its type picks
the parsing: int/float/str as such, `X | None` also accepts 'none', booleans get `--flag/--no-flag`,
tuples of strings are repeatable, tuples of ints are comma lists, dicts (per-layer overrides) take
repeatable `GLOB=SETTINGS`. Every flag defaults to "not given", so the config's own default applies
(the help shows it); `settings_from_args` collects what was given for one config class.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable

from slimlm.core.errors import SlimError

NOT_GIVEN = None


class _NoneGiven:
    """'none' typed for an optional setting (`--group-size none`): unlike a flag left out (NOT_GIVEN),
    it sets the field to None."""

    def __repr__(self) -> str:
        return "none"


NONE_GIVEN = _NoneGiven()


def _parse_none_or(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", "channel", "per-channel"):
            return NONE_GIVEN
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__} or 'none'") from None

    parse.__name__ = kind.__name__
    return parse


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 1,4") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """'GLOB=skip' or 'GLOB=key:value,key:value' (values parsed as YAML scalars: 8, none, true)."""
    import yaml

    glob, sep, spec = text.partition("=")
    if not sep or not glob or not spec:
        raise SlimError(f"--override '{text}' must look like 'GLOB=skip' or 'GLOB=bits:8,group_size:none'")
    if spec.strip() == "skip":
        return glob, "skip"
    settings = {}
    for item in spec.split(","):
        key, sep, value = item.partition(":")
        if not sep:
            raise SlimError(f"--override '{text}': '{item}' must look like key:value, e.g. bits:8")
        value = value.strip()
        settings[key.strip()] = None if value.lower() in ("none", "null", "channel") else yaml.safe_load(value)
    return glob, settings


FLAG_NAMES = {"overrides": "override"}  # field -> flag where the singular reads better


def flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


def _kind(annotation) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of a field annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _cli_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_config_flags(parser, classes: Iterable[type], skip: Iterable[str] = (), owners: dict[type, str] | None = None) -> None:
    """Add one flag per CLI field of `classes` (a field shared by several classes gets one flag, whose
    help names the default of each where they differ). `owners` labels classes in that help."""
    skip = set(skip)
    seen: dict[str, list[tuple[type, dataclasses.Field, Any]]] = {}
    for cls in classes:
        for f, annotation in _cli_fields(cls):
            if f.name not in skip:
                seen.setdefault(f.name, []).append((cls, f, annotation))
    for name, entries in seen.items():
        cls, f, annotation = entries[0]
        defaults: dict[str, list[str]] = {}
        for c, field_, _ in entries:
            defaults.setdefault(_shown(_default(field_)), []).append((owners or {}).get(c, c.__name__))
        if len(defaults) == 1:
            note = f"default {next(iter(defaults))}"
        else:
            note = "default " + "; ".join(f"{value} for {', '.join(who)}" for value, who in defaults.items())
        help_text = f"{f.metadata['help']} ({note})".replace("%", "%%")  # argparse %-formats help
        base, optional = _kind(annotation)
        kwargs: dict[str, Any] = dict(dest=name, default=NOT_GIVEN, help=help_text)
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        origin = typing.get_origin(base)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple and typing.get_args(base)[0] is int:
            kwargs["type"] = int_list
        elif origin is tuple:
            kwargs["action"] = "append"
        elif base is dict or origin is dict:
            kwargs["action"] = "append"
            kwargs["type"] = str
        elif base in (int, float, str):
            kwargs["type"] = _parse_none_or(base) if optional and base is not str else base
        else:
            raise TypeError(f"no CLI parsing for field {cls.__name__}.{name}: {annotation}")
        names = [f.metadata["short"]] if f.metadata.get("short") else []
        parser.add_argument(*names, flag(name), **kwargs)


def given_flags(args: argparse.Namespace, classes: Iterable[type]) -> list[str]:
    """The config flags given on the command line, among those of `classes`."""
    names = {f.name for cls in classes for f, _ in _cli_fields(cls)}
    return [flag(name) for name in sorted(names) if getattr(args, name, NOT_GIVEN) is not NOT_GIVEN]


def settings_from_args(args: argparse.Namespace, cls: type, method: str | None = None,
                       all_classes: Iterable[type] = ()) -> dict[str, Any]:
    """The settings of config class `cls` whose flags were given. A flag given that belongs to another
    of `all_classes` but not to `cls` is an error naming the method it does not apply to."""
    own = {f.name: (f, a) for f, a in _cli_fields(cls)}
    settings: dict[str, Any] = {}
    for other in all_classes:
        for f, _ in _cli_fields(other):
            if f.name not in own and getattr(args, f.name, NOT_GIVEN) is not NOT_GIVEN:
                raise SlimError(f"{flag(f.name)} does not apply to {method or cls.__name__}")
    for name, (f, annotation) in own.items():
        value = getattr(args, name, NOT_GIVEN)
        if value is NOT_GIVEN:
            continue
        base, _ = _kind(annotation)
        if base is dict or typing.get_origin(base) is dict:
            value = dict(parse_override(text) for text in value)
        settings[name] = None if value is NONE_GIVEN else value
    return settings
