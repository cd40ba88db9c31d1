"""`plan`: the compression that fits a size budget with the least predicted loss, as a recipe.

1. Candidate treatments per layer: round-to-nearest int8 / int4 g128 / int4 g32 / int3 g32 / int2 g32,
   and (with `gptq`) GPTQ int8 / int4 g128 / int4 g32 / int3 g32, each GPTQ run once over the whole
   model and read off it per layer (`sensitivity.from_model`).
2. Per-layer sensitivity on calibration windows (`sensitivity.measure_sensitivity`).
3. The exact size / predicted-KL Pareto front (`allocate.pareto_front`) and its best point within the
   budget.
4. The point as a recipe (one step per treatment, `include` naming its layers; data-free steps first,
   then the calibrated ones) that `slimlm.apply` / `slimlm quantize --recipe` run on the original model.

Not built yet (see the planner issue): speed floors and targets, structured pruning and recovery in
the search, the HTML report. The sensitivity measurement resumes from its state file; the GPTQ runs are redone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor, nn

from slimlm.core.config import Config, check, field
from slimlm.planner.allocate import Front, Point, pareto_front
from slimlm.planner.sensitivity import Sensitivity, from_model, measure_sensitivity

# treatment -> recipe step (method and settings) that makes it
STEPS: dict[str, dict[str, Any]] = {
    "int8": dict(method="rtn", bits=8, group_size=None, symmetric=True),
    "int4 g128": dict(method="rtn", bits=4, group_size=128, symmetric=False),
    "int4 g32": dict(method="rtn", bits=4, group_size=32, symmetric=False),
    "int3 g32": dict(method="rtn", bits=3, group_size=32, symmetric=False),
    "int2 g32": dict(method="rtn", bits=2, group_size=32, symmetric=False),
    "gptq int8": dict(method="gptq", bits=8, group_size=None, symmetric=True),
    "gptq int4 g128": dict(method="gptq", bits=4, group_size=128, symmetric=False),
    "gptq int4 g32": dict(method="gptq", bits=4, group_size=32, symmetric=False),
    "gptq int3 g32": dict(method="gptq", bits=3, group_size=32, symmetric=False),
}
RTN = ["int8", "int4 g128", "int4 g32", "int3 g32", "int2 g32"]
GPTQ = ["gptq int8", "gptq int4 g128", "gptq int4 g32", "gptq int3 g32"]


@dataclasses.dataclass(frozen=True)
class PlanConfig(Config):
    """What `slimlm plan` searches with."""

    name = "plan"
    max_size: str = field("", "budget for the blocks' linear weights (embedding and head excluded): 140KB, 600MB, 1.5GB")
    max_kl: float | None = field(None, "instead of a size: the smallest plan whose predicted KL (nats/token, the sum "
                                       "of per-layer KLs, which under-predicts by ~2x) is at most this")
    calib: str = field("demo", "calibration text (.txt, .jsonl, 'demo'; FILE@0:200 for a range of documents)")
    windows: int = field(8, "calibration windows the per-layer sensitivity is measured on")
    seq_len: int = field(256, "tokens per window (sensitivity and GPTQ)")
    n_samples: int = field(128, "GPTQ calibration windows")
    gptq: bool = field(True, "also offer GPTQ's codes for every layer (one GPTQ run per scheme)")
    method: str = field("fisher", "sensitivity measurement: fisher (block by block, second order; fast) or direct "
                                  "(one whole forward per layer and treatment; exact, slow)")
    fisher_samples: int = field(4, "sampled next tokens per window for the fisher method's Fisher information")

    def __post_init__(self) -> None:
        check(bool(self.max_size) != (self.max_kl is not None),
              "give one budget: --max-size 140KB (the blocks' linear weights) or --max-kl 0.05")
        if self.max_size:
            parse_size(self.max_size)
        check(self.max_kl is None or (isinstance(self.max_kl, (int, float)) and self.max_kl > 0),
              f"max_kl {self.max_kl!r} must be a positive number")
        from slimlm.planner.sensitivity import METHODS

        check(self.method in METHODS, f"method '{self.method}' is not one of {', '.join(METHODS)}")
        for name in ("windows", "seq_len", "n_samples", "fisher_samples"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} {value!r} must be at least 1")


@dataclasses.dataclass
class Plan:
    sensitivity: Sensitivity
    front: Front
    point: Point
    recipe: list[dict[str, Any]]

    def treatments(self) -> dict[str, str]:
        """Layer -> chosen treatment."""
        names = [[o.name for o in layer] for layer in self.sensitivity.options()]
        return {layer: names[i][j] for i, (layer, j) in enumerate(zip(self.sensitivity.layers, self.point.choice))}


def recipe_for(choice: dict[str, str], calibration: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One step per treatment used, its layers named in `include` (data-free steps first)."""
    steps = []
    for name in sorted(set(choice.values()), key=lambda t: (STEPS[t]["method"] != "rtn", t)):
        step = dict(STEPS[name], include=sorted(layer for layer, t in choice.items() if t == name))
        if step["method"] != "rtn" and calibration:
            step.update(calibration)
        steps.append(step)
    return steps


def plan(load: Callable[[], nn.Module], tokens: Tensor, max_bytes: int | None, calibration: Tensor | None = None,
         gptq: bool = True, gptq_settings: dict[str, Any] | None = None,
         on_layer: Callable[[int, int], None] | None = None, state: str | None = None,
         max_kl: float | None = None, method: str = "fisher", fisher_samples: int = 4) -> Plan:
    """Plan `load()`'s compression within `max_bytes` of block linear weights (or, with max_kl instead,
    the smallest plan predicted within that KL). tokens (n, T): the
    sensitivity windows; calibration: token ids for the GPTQ treatments (default: `tokens`). state: a
    JSON file the sensitivity measurement saves after every layer and resumes from."""
    import slimlm

    base = load()
    extra = {}
    if gptq:
        for name in GPTQ:
            settings = {k: v for k, v in STEPS[name].items() if k != "method"}
            copy = slimlm.quantize(load(), "gptq", calibration=tokens if calibration is None else calibration,
                                   **settings, **(gptq_settings or {}))
            extra[name] = from_model(copy)
    sensitivity = measure_sensitivity(base, tokens, names=RTN, extra=extra, on_layer=on_layer, state=state,
                                      method=method, fisher_samples=fisher_samples)
    front = pareto_front(sensitivity.options())
    point = front.best(max_bytes) if max_kl is None else front.smallest(max_kl)
    result = Plan(sensitivity, front, point, [])
    result.recipe = recipe_for(result.treatments(), gptq_settings)
    return result


def parse_size(text: str) -> int:
    """'140KB', '600MB', '1.5GB' or a number of bytes -> bytes (decimal units)."""
    from slimlm.core.errors import SlimError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)].strip(), factor
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise SlimError(f"size '{text}' is not a size; write it like 140KB, 600MB or 1.5GB") from None
    if value <= 0:
        raise SlimError(f"size '{text}' must be positive")
    return int(value)
