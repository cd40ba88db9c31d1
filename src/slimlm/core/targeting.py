"""Choosing which modules a step acts on: linear layers matched by name globs.

Names are the dotted names of `model.named_modules()`. `include` and `exclude` are shell-style
globs (`fnmatch`): `*.mlp.*`, `model.layers.0.*`. The output head is excluded unless named
explicitly (quantizing it hurts quality most and saves little on small-vocabulary models).
A glob that matches no linear layer is an error: a typo must not silently do nothing.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from typing import Any, Iterable

from torch import nn

from slimlm.core.config import check, field
from slimlm.core.errors import SlimError
from slimlm.core.layers import linear_layers, output_head_name


def as_globs(value: Any, name: str) -> tuple[str, ...]:
    """A tuple of name globs from one glob, a list or a tuple (what YAML and the CLI give)."""
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, list):
        value = tuple(value)
    check(isinstance(value, tuple) and all(isinstance(g, str) for g in value),
          f"{name} must be a list of name globs, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class TargetFields:
    """Which linear layers a step acts on (a mixin of step configs)."""

    include: tuple[str, ...] = field(("*",), "name glob of layers to act on (repeatable; the output head only "
                                     "when named, e.g. --include '*' --include lm_head)")
    exclude: tuple[str, ...] = field((), "name glob of layers to leave alone (repeatable)")

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            object.__setattr__(self, name, as_globs(getattr(self, name), name))

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        return select_linear(model, self.include, self.exclude)

    def layer_plan(self, model: nn.Module) -> dict[str, str]:
        """Layer name -> what the step does to it (what `--dry-run` prints)."""
        return {name: self.describe() for name in self.select(model)}


def select_linear(
    model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """Linear layers whose name matches any `include` glob and no `exclude` glob.

    The output head is left out unless an include glob names it exactly.
    """
    include, exclude = tuple(include), tuple(exclude)
    layers = linear_layers(model)
    head = output_head_name(model)
    for glob in include + exclude:
        if not any(fnmatchcase(name, glob) for name in layers):
            sample = ", ".join(list(layers)[:4]) or "(the model has none)"
            raise SlimError(f"glob '{glob}' matches no linear layer; layer names look like: {sample}")
    chosen = {}
    for name, module in layers.items():
        if not any(fnmatchcase(name, g) for g in include) or any(fnmatchcase(name, g) for g in exclude):
            continue
        if name == head and head not in include:
            continue
        chosen[name] = module
    return chosen
