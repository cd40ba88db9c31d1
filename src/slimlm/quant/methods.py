"""Registry of quantization methods: name -> (config class, function that applies it in place).

`slimlm.quantize(model, "rtn", bits=4)` looks the name up here, builds the config from the
keyword arguments (unknown ones are rejected with the valid list) and applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from slimlm.core.config import Config
from slimlm.core.registry import Registry


@dataclass(frozen=True)
class Method:
    config_cls: type[Config]
    apply: Callable[[nn.Module, Config], nn.Module]


METHODS: Registry[Method] = Registry("quantization method")


def get_method(name: str) -> Method:
    from slimlm.quant import cast, rtn  # noqa: F401  (built-in methods register on import)

    return METHODS.get(name)
