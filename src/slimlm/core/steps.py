"""The plug-in table of compression steps, quantization and pruning alike, keyed by config class.

A step is a config class (frozen dataclass: its fields are the step's settings, its `name` the alias
recipes, YAML and the CLI use) and a function that applies it to a model in place, as torchao keys
`quantize_` handlers by the config's type. `slimlm.quantize(model, GPTQConfig(bits=4))` and
`slimlm.quantize(model, "gptq", bits=4)` reach the same entry; a recipe step `{method: gptq, ...}`
is dispatched by the step it names, not by which verb's list the name is in.

The built-in steps are listed below by module path and loaded on first use (nothing registers itself
on import); `STEPS.register(MyStep(...))` adds a user's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor, nn

from slimlm.core.config import Config
from slimlm.core.errors import SlimError
from slimlm.core.registry import Registry

KINDS = ("quantize", "prune", "recover")
Apply = Callable[[nn.Module, Config, "Tensor | None", "Callable[[int, int], None] | None"], nn.Module]


@dataclasses.dataclass(frozen=True)
class Step:
    config_cls: type[Config]
    apply: Apply  # (model, config, calibration windows (n, T) or None, on_block) -> the model, changed in place
    kind: str  # "quantize" or "prune": which verb runs it; "recover": recipes only (after other steps)
    calibrated: bool | Callable[[Any], bool] = False  # needs calibration windows (or a function of the config)
    summary: str = ""  # one line for `--help` and error messages
    needs_original: bool = False  # apply(..., original=) gets the model as the recipe received it (a teacher)

    @property
    def name(self) -> str:
        return self.config_cls.name

    def needs_samples(self, config: Config) -> bool:
        return self.calibrated(config) if callable(self.calibrated) else bool(self.calibrated)


class StepTable:
    """Steps by name (the aliases) and by config class."""

    def __init__(self, builtins: dict[str, str]) -> None:
        self.registry: Registry[Step] = Registry("compression method", builtins)

    def register(self, step: Step) -> Step:
        self.registry.register(step.name, step)
        return step

    def names(self, kind: str | None = None) -> list[str]:
        return [name for name, step in self.registry.items() if kind is None or step.kind == kind]

    def steps(self, kind: str | None = None) -> list[Step]:
        return [step for step in self.registry.values() if kind is None or step.kind == kind]

    def get(self, name: str, kind: str | None = None) -> Step:
        if kind is not None and name not in self.registry:
            label = {"quantize": "quantization", "prune": "pruning"}[kind]
            raise SlimError(f"unknown {label} method '{name}'; valid: {', '.join(self.names(kind))}")
        return self.registry.get(name)

    def for_config(self, config: Config) -> Step:
        """The step whose config class is `type(config)` (or its nearest registered base class)."""
        by_class = {step.config_cls: step for step in self.registry.values()}
        for cls in type(config).__mro__:
            if cls in by_class:
                return by_class[cls]
        raise SlimError(f"{type(config).__name__} is not the config of a registered compression step; "
                        f"known: {', '.join(self.names())}")

    def resolve(self, method: "str | Config", settings: dict[str, Any], kind: str | None = None) -> tuple[Step, Config]:
        """(step, config) from a name and settings, or from a config object (then settings must be empty);
        `kind` refuses a step of the other verb with a message naming the right one."""
        if isinstance(method, Config):
            if settings:
                raise SlimError(f"pass the settings inside {type(method).__name__}(...), not as keyword arguments "
                                f"({', '.join(settings)})")
            step, config = self.for_config(method), method
        elif isinstance(method, str):
            step = self.get(method, kind)
            config = step.config_cls.from_dict(settings)
        else:
            raise SlimError(f"method must be a name ({', '.join(self.names(kind))}) or a config object, "
                            f"not {type(method).__name__}")
        if kind is not None and step.kind != kind and step.kind == "recover":
            raise SlimError(f"'{step.name}' trains the model after earlier recipe steps; run it as a recipe step "
                            f"(slimlm.apply, or --recipe) after the step it recovers from")
        if kind is not None and step.kind != kind:
            raise SlimError(f"'{step.name}' is a {step.kind} method; use slimlm.{step.kind} (or `slimlm {step.kind}`), "
                            f"or a recipe, which runs either")
        return step, config


STEPS = StepTable(builtins={
    "cast": "slimlm.quant.cast:CAST",
    "rtn": "slimlm.quant.rtn:RTN",
    "gptq": "slimlm.quant.gptq:GPTQ",
    "awq": "slimlm.quant.awq:AWQ",
    "smoothquant": "slimlm.quant.smoothquant:SMOOTHQUANT",
    "magnitude": "slimlm.pruning.magnitude:MAGNITUDE",
    "random": "slimlm.pruning.magnitude:RANDOM",
    "taylor": "slimlm.pruning.taylor:TAYLOR",
    "wanda": "slimlm.pruning.wanda:WANDA",
    "sparsegpt": "slimlm.pruning.sparsegpt:SPARSEGPT",
    "heads": "slimlm.pruning.structured:HEADS",
    "channels": "slimlm.pruning.structured:CHANNELS",
    "blocks": "slimlm.pruning.structured:BLOCKS",
    "recover": "slimlm.distillation.recover:RECOVER",
})
