"""One registry per kind of plug-in: a dict plus a decorator, filled by explicit imports."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from slimlm.core.errors import SlimError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plug-ins of one kind (quantization methods, kernels, ...).

    A failed lookup raises a `SlimError` that lists the valid names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise SlimError(f"unknown {self.kind} '{name}'; valid: {valid}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items
