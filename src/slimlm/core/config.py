"""Frozen, versioned config dataclasses.

CLI flags, YAML recipes and the metadata saved with a model all come from the same fields.
Unknown keys are rejected with the list of valid ones; values are checked in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from slimlm.core.errors import SlimError

C = TypeVar("C", bound="Config")


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
