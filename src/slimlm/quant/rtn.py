"""Round-to-nearest (RTN) weight quantization: every targeted linear layer becomes a QuantizedLinear.

The data-free baseline of every weight-only quantization paper (e.g. GPTQ, arXiv 2210.17323,
compares against it): scales from each group's range, codes by rounding. No calibration data.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from slimlm.core.config import check
from slimlm.core.targeting import replace_module_, select_linear
from slimlm.quant.linear import QuantizedLinear, check_finite_weight
from slimlm.quant.methods import METHODS, Method
from slimlm.quant.scheme import QuantScheme


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantScheme):
    """A QuantScheme plus which layers to quantize (name globs; the output head is excluded by default)."""

    name = "rtn"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("include", "exclude"):
            value = getattr(self, field)
            if isinstance(value, str):
                object.__setattr__(self, field, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
            check(all(isinstance(g, str) for g in getattr(self, field)), f"{field} must be a list of name globs")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(**{name: getattr(self, name) for name in QuantScheme.field_names()})


def rtn_quantize_(model: nn.Module, config: RTNConfig) -> nn.Module:
    """Quantize the selected linear layers of `model` in place; returns the model."""
    for name, module in select_linear(model, config.include, config.exclude).items():
        check_finite_weight(name, module.weight)
        replace_module_(model, name, QuantizedLinear.from_float(module, config.scheme))
    return model


METHODS.register("rtn")(Method(RTNConfig, rtn_quantize_))
