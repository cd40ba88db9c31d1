"""Round-to-nearest (RTN) weight quantization: every targeted linear layer becomes a QuantizedLinear.

The data-free baseline of every weight-only quantization paper (e.g. GPTQ, arXiv 2210.17323,
compares against it): scales from each group's range, codes by rounding. No calibration data.
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from slimlm.core.config import check, field
from slimlm.core.layers import replace_module_
from slimlm.core.steps import Step
from slimlm.core.targeting import TargetFields
from slimlm.quant.linear import QuantizedLinear, check_finite_weight
from slimlm.quant.scheme import QuantScheme


@dataclasses.dataclass(frozen=True)
class RTNConfig(TargetFields, QuantScheme):
    """A QuantScheme plus which layers to quantize (name globs; the output head is excluded by default)
    and per-layer exceptions: `overrides` maps a name glob to scheme fields that replace the defaults
    for the layers it matches (`{"*.self_attn.*": {"bits": 8, "group_size": None}}`) or to "skip" to
    leave them as they are (e.g. the first and last blocks of a bf16 model). The first matching glob wins."""

    name = "rtn"
    overrides: dict[str, Any] = field(dict, "per-layer scheme, first matching glob wins: "
                                      "'*.self_attn.*=bits:8,group_size:none' or 'model.layers.0.*=skip' (repeatable)",
                                      metavar="GLOB=SETTINGS", factory=True)

    def __post_init__(self) -> None:
        QuantScheme.__post_init__(self)
        TargetFields.__post_init__(self)
        check(isinstance(self.overrides, dict), "overrides must map name globs to scheme settings or 'skip'")
        fields = set(QuantScheme.field_names())
        for glob, value in self.overrides.items():
            check(isinstance(glob, str), f"override key {glob!r} must be a layer name glob")
            if value == "skip":
                continue
            check(isinstance(value, dict) and set(value) <= fields,
                  f"override for '{glob}' must be 'skip' or scheme settings among {', '.join(sorted(fields))}; got {value!r}")
            self._base_scheme(value)  # validates the combination now, not halfway through quantizing

    def _base_scheme(self, changes: dict[str, Any] | None = None) -> QuantScheme:
        values = {name: getattr(self, name) for name in QuantScheme.field_names()}
        return QuantScheme(**{**values, **(changes or {})})

    @property
    def scheme(self) -> QuantScheme:
        return self._base_scheme()

    def scheme_for(self, name: str) -> QuantScheme | None:
        """The scheme of layer `name` (None: leave it unquantized)."""
        for glob, value in self.overrides.items():
            if fnmatchcase(name, glob):
                return None if value == "skip" else self._base_scheme(value)
        return self.scheme

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The selected layers that are not skipped by an override; an override glob matching none is an error."""
        selected = self.select(model)
        for glob in self.overrides:
            check(any(fnmatchcase(name, glob) for name in selected),
                  f"override glob '{glob}' matches none of the {len(selected)} selected layers, e.g. {next(iter(selected), '-')}")
        return {name: m for name, m in selected.items() if self.scheme_for(name) is not None}

    def layer_plan(self, model: nn.Module) -> dict[str, str]:
        """Layer name -> the scheme it gets (what `--dry-run` prints)."""
        return {name: self.scheme_for(name).label() for name in self.targets(model)}

    def describe(self) -> str:
        overrides = f" ({len(self.overrides)} overrides)" if self.overrides else ""
        return f"{self.name} {self.scheme.label()}{overrides}"


def rtn_quantize_(model: nn.Module, config: RTNConfig, samples=None, on_block=None) -> nn.Module:
    """Quantize the selected linear layers of `model` in place; returns the model."""
    for name, module in config.targets(model).items():
        check_finite_weight(name, module.weight)
        replace_module_(model, name, QuantizedLinear.from_float(module, config.scheme_for(name)))
    return model


RTN = Step(RTNConfig, rtn_quantize_, "quantize", summary="round-to-nearest weight quantization (data-free)")
