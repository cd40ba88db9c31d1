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
    apply: Callable[..., nn.Module]  # (model, config) or, when calibrated, (model, config, samples, on_block)
    calibrated: bool = False  # needs calibration samples (n, T) of token ids


METHODS: Registry[Method] = Registry("quantization method")


def get_method(name: str) -> Method:
    from slimlm.quant import awq, cast, gptq, rtn, smoothquant  # noqa: F401  (built-in methods register on import)

    return METHODS.get(name)
