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
from slimlm.core.layers import is_compressed, is_linear, output_head_name, replace_module_
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
    head: str = field("auto", "output head when --include does not name it: auto (int8 per-channel when every layer "
                              "is targeted and the head is not tied to the embeddings), int8 (also unties a tied "
                              "head, which then costs vocab x hidden bytes more), or float")

    def __post_init__(self) -> None:
        QuantScheme.__post_init__(self)
        TargetFields.__post_init__(self)
        check(self.head in HEAD_CHOICES, f"head '{self.head}' is not one of {', '.join(HEAD_CHOICES)}")
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
        return QuantScheme(**self.field_values(changes))

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
        """Layer name -> the scheme it gets (what `--dry-run` prints), the output head included."""
        plan = {name: self.scheme_for(name).label() for name in self.targets(model)}
        head = head_to_quantize(model, self)
        if head is not None:
            plan[head] = HEAD_SCHEME.label() + " (output head)"
        return plan

    def describe(self) -> str:
        overrides = f" ({len(self.overrides)} overrides)" if self.overrides else ""
        return f"{self.name} {self.scheme.label()}{overrides}"


HEAD_CHOICES = ("auto", "int8", "float")
# The output head's default treatment: int8 with one scale per vocabulary row (symmetric, so GGUF's Q8_0
# holds it exactly). The head is the largest matrix a decode step reads (a 1.1B Llama's 32000x2048
# head is 6% of its parameters, but left in bf16 a fifth of the bytes an int4 step reads); llama.cpp
# likewise keeps its output tensor at about 6 bits in Q4 files. Measured cost: README "The output head".
HEAD_SCHEME = QuantScheme(bits=8, group_size=None, symmetric=True)


def tied_head(model: nn.Module, head: nn.Module) -> bool:
    """The head's weight is the input embedding's (tie_word_embeddings)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight is not None and embed is not None and getattr(embed, "weight", None) is weight


def head_to_quantize(model: nn.Module, config: RTNConfig) -> str | None:
    """The output head's name when `config.head` has the step quantize it to int8 (`quantize_head_`)."""
    name = output_head_name(model)
    if name is None or config.head == "float" or name in config.include or "*" not in config.include:
        return None  # no head; kept float; named by --include (the body's scheme); or a partial step (the planner's)
    module = model.get_submodule(name)
    if not is_linear(module) or (config.head == "auto" and tied_head(model, module)):
        return None
    return name


def quantize_head_(model: nn.Module, config: RTNConfig) -> None:
    """Quantize the output head to int8 per-channel where `head_to_quantize` says so. A tied head that
    is now quantized (head=int8, or named by --include) is untied: the embedding keeps its float weight."""
    name = head_to_quantize(model, config)
    if name is not None:
        module = model.get_submodule(name)
        check_finite_weight(name, module.weight)
        replace_module_(model, name, QuantizedLinear.from_float(module, HEAD_SCHEME))
    head = output_head_name(model)
    if head is not None and is_compressed(model.get_submodule(head)):
        untie_(model)


def untie_(model: nn.Module) -> None:
    """Record that the head no longer shares the embedding's weight, so loading does not tie them again."""
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.tie_word_embeddings = False


def rtn_quantize_(model: nn.Module, config: RTNConfig, samples=None, on_block=None) -> nn.Module:
    """Quantize the selected linear layers of `model` in place, and the output head as `config.head`
    says; returns the model."""
    for name, module in config.targets(model).items():
        check_finite_weight(name, module.weight)
        replace_module_(model, name, QuantizedLinear.from_float(module, config.scheme_for(name)))
    quantize_head_(model, config)
    return model


RTN = Step(RTNConfig, rtn_quantize_, "quantize", summary="round-to-nearest weight quantization (data-free)")
