"""Frozen, versioned config dataclasses.

CLI flags, YAML recipes and the metadata saved with a model all come from the same fields: declare a
field with `field(default, help)` and `slimlm <verb>` derives its flag (name, type, help) from it
(`commands/_flags.py`). Unknown keys are rejected with the list of valid ones; values are checked in
`__post_init__`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from slimlm.core.errors import SlimError

C = TypeVar("C", bound="Config")


def field(default: Any, help: str, *, cli: bool = True, metavar: str | None = None, short: str | None = None,
          factory: bool = False):
    """A config field with its help text (the CLI flag's help and the docs); cli=False keeps it out of
    the command line (settable from Python and YAML only); short: a one-letter alias of the flag.
    factory: `default` is a zero-argument callable."""
    metadata = {"help": help, "cli": cli, "metavar": metavar, "short": short}
    if factory:
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every slimlm config: `from_dict` / `to_dict` with strict keys and a format version."""

    version: ClassVar[int] = 1
    name: ClassVar[str] = "config"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        values = dict(values)
        version = values.pop("version", cls.version)
        if version != cls.version:
            raise SlimError(
                f"{cls.name} config has version {version}, this slimlm reads version {cls.version}; "
                "upgrade slimlm or re-create the config"
            )
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise SlimError(
                f"unknown {cls.name} setting(s) {', '.join(unknown)}; valid: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    def describe(self) -> str:
        """A short label for reports, e.g. 'rtn int4 g32 asym' (steps override it)."""
        return self.name

    def layer_plan(self, model: Any) -> dict[str, str]:
        """Layer name -> what the step does to it, for `--dry-run` (steps that target layers override it)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def check(condition: bool, message: str) -> None:
    """Raise a SlimError with `message` unless `condition` holds (for `__post_init__` validation)."""
    if not condition:
        raise SlimError(message)
