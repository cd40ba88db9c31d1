"""One pattern for every kind of plug-in (compression steps, kernels, compressed layer kinds, checkpoint
formats): a `Registry` filled from an explicit list of built-ins plus whatever users register.

The built-ins are named as `"module:attribute"` strings and imported the first time the registry is
read, so importing slimlm stays cheap, nothing registers itself as an import side effect, and the
list is complete (`names()`) before any lookup. Users add their own with `register(name, item)` (or
the decorator form) at any time, before or after the built-ins load.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterable, TypeVar

from slimlm.core.errors import SlimError

T = TypeVar("T")


def import_object(path: str):
    """The object named by 'package.module:attribute'."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """Named plug-ins of one kind. A failed lookup raises a `SlimError` that lists the valid names."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.builtins = dict(builtins or {})  # name -> "module:attribute"
        self._items: dict[str, T] = {}
        self._loaded = not self.builtins

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first, so a built-in module that reads the registry does not recurse
        loaded = {name: import_object(path) for name, path in self.builtins.items()}
        self._items = {**loaded, **self._items}  # built-ins first, in their listed order

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """`registry.register("name", item)`, or `@registry.register("name")` as a decorator."""

        def add(obj: T) -> T:
            if name in self._items or name in self.builtins:
                raise ValueError(f"{self.kind} '{name}' is registered twice (or is a built-in name); choose another")
            self._items[name] = obj
            return obj

        return add(item) if item is not None else add

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise SlimError(f"unknown {self.kind} '{name}'; valid: {', '.join(sorted(self._items)) or '(none)'}") from None

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._items.items())

    def values(self) -> Iterable[T]:
        self._load()
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items
