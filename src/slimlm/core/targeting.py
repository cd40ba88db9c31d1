"""Choosing which modules a step acts on: linear layers matched by name globs.

Names are the dotted names of `model.named_modules()`. `include` and `exclude` are shell-style
globs (`fnmatch`): `*.mlp.*`, `model.layers.0.*`. The output head is excluded unless named
explicitly (quantizing it hurts quality most and saves little on small-vocabulary models).
A glob that matches no linear layer is an error: a typo must not silently do nothing.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable

from torch import nn

from slimlm.core.errors import SlimError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style `Conv1D`: a linear layer whose weight is stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All dense linear layers (nn.Linear and GPT-2 Conv1D) by name, in module order."""
    return {name: m for name, m in model.named_modules() if name and is_linear(m)}


def output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


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


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` was (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
