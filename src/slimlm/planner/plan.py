"""`plan`: the compression that fits a size budget with the least predicted loss, as a recipe.

0. (`slimlm plan`'s default, `prefix`) AWQ's activation-aware scales folded into the weights; the
   rest is planned on the smoothed model and the recipe starts with that step.
1. Candidate treatments per layer: round-to-nearest int8 / int4 g128 / int4 g32 / int3 g32 / int2 g32,
   and (with `gptq`) GPTQ int8 / int4 g128 / int4 g32 / int3 g32, each GPTQ run once over the whole
   model and read off it per layer (`sensitivity.from_model`).
2. Per-layer sensitivity on calibration windows (`sensitivity.measure_sensitivity`).
3. The exact size / predicted-KL Pareto front (`allocate.pareto_front`) and its best point within the
   budget.
4. The point as a recipe (one step per treatment, `include` naming its layers; data-free steps first,
   then the calibrated ones) that `slimlm.apply` / `slimlm quantize --recipe` run on the original model.

With speed budgets (`--min-decode`, `--max-ttft`, `--min-throughput`, the targets), each treatment
also carries its predicted seconds per step on this machine (`planner.speed`), the allocation holds
them to the budget (`allocate.solve`), and the chosen plan is built and measured; a build slower
than its budget is re-planned with the measured error. The sensitivity measurement resumes from
its state file; the GPTQ runs are redone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from torch import Tensor, nn

from slimlm.core.config import Config, check, field
from slimlm.core.errors import SlimError
from slimlm.planner.allocate import Front, Option, Totals, pareto_front
from slimlm.planner.sensitivity import Sensitivity, SensitivityFields, from_model, measure_sensitivity
from slimlm.planner.space import METHODS, parse_structure
from slimlm.planner.speed import SpeedModel

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


# AWQ's activation-aware scales folded into the weights before the allocation (the function is
# unchanged; each layer's codes are then found on the smoothed weights): `slimlm plan`'s default
AWQ_SCALES = dict(method="awq", bits=4, group_size=128, symmetric=False, quantize=False)

TARGETS = ("edge", "realtime", "cloud")
DEFAULT_KL = 0.05  # edge and cloud, without a budget: the predicted KL they stay within
DEFAULT_DECODE = 20.0  # realtime, without --min-decode: tokens/s at batch 1 (faster than one reads)


@dataclasses.dataclass(frozen=True)
class PlanConfig(SensitivityFields, Config):
    """What `slimlm plan` searches with (the sensitivity's fields, and seq_len for GPTQ too)."""

    name = "plan"
    target: str = field("", "edge (the smallest within --max-kl, default 0.05, or the best within --max-size), "
                            "realtime (the best with batch-1 decode >= --min-decode, default 20 tok/s), "
                            "cloud (the most throughput at --streams within --max-kl, default 0.05)")
    max_size: str = field("", "budget for the blocks' linear weights (embedding and head excluded): 140KB, 600MB, 1.5GB")
    max_kl: float | None = field(None, "a quality budget: predicted KL (nats/token, the sum of per-layer KLs, which "
                                       "under-predicts by ~2x) at most this; alone: the smallest plan within it")
    min_decode: float | None = field(None, "a speed floor: batch-1 decode tokens/s on this machine (slimlm's engine)")
    max_ttft: float | None = field(None, "a latency budget: milliseconds to the first token of a --prompt-tokens prompt")
    min_throughput: float | None = field(None, "a throughput floor: tokens/s over --streams concurrent sequences")
    streams: int = field(32, "concurrent sequences for cloud and --min-throughput")
    prompt_tokens: int = field(128, "prompt length of the speed figures")
    verify: bool = field(True, "build the chosen model and measure its size, KL, perplexity and speed; a missed "
                               "speed budget is re-planned with the measured error (at most 3 times)")
    eval_data: str = field("", "held-out text the check measures KL and perplexity on (default: the model's held-out "
                               "text for 'demo', else the calibration text after the windows measured)")
    eval_tokens: int = field(8192, "held-out tokens the check reads")
    n_samples: int = field(128, "GPTQ calibration windows")
    gptq: bool = field(True, "also offer GPTQ's codes for every layer (one GPTQ run per scheme)")
    awq: bool = field(True, "fold AWQ's activation-aware scales into the weights first (the function is unchanged; "
                            "the codes of every layer are then found on smoothed weights)")
    search: bool = field(False, "search over recipes too: structure (--structures), recovery (--recover-steps) and "
                                "the method (--methods) around the allocation, by successive halving; finalists "
                                "checked on held-out text (slower: one plan per candidate and rung)")
    structures: tuple[str, ...] = field(("blocks:0.2", "channels:0.25", "heads:0.25"),
                                        "search: structures tried besides none, KIND:FRACTION with KIND blocks, "
                                        "channels or heads (repeat the flag for several)")
    recover_steps: int = field(100, "search: distillation steps tried after each structure (0: no recovery)")
    methods: tuple[str, ...] = field(("rtn", "gptq", "awq", "awq+gptq"),
                                     "search: methods the allocation's codes come from: rtn, gptq, awq, awq+gptq "
                                     "(repeat the flag for several)")
    eta: int = field(3, "search: each rung keeps the best 1/eta of its candidates, with eta times the data")
    rungs: int = field(3, "search: rounds of successive halving (the last checks the finalists on held-out text)")
    slice_tokens: int = field(4096, "search: calibration tokens (after the sensitivity windows) the last rung before "
                                    "the finalists scores; earlier rungs score 1/eta of it per rung")

    def __post_init__(self) -> None:
        SensitivityFields.__post_init__(self)
        check(not self.target or self.target in TARGETS, f"target '{self.target}' is not one of {', '.join(TARGETS)}")
        if self.max_size:
            parse_size(self.max_size)
        for name in ("max_kl", "min_decode", "max_ttft", "min_throughput"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)),
                  f"{name} {value!r} must be a positive number")
        if self.search:  # the space's names checked before any work
            for structure in self.structures:
                parse_structure(structure)
            for m in self.methods:
                check(m in METHODS, f"method '{m}' is not one of {', '.join(METHODS)}")
            check(bool(self.methods), "give at least one --methods for the search")
            check(isinstance(self.eta, int) and self.eta >= 2, f"eta {self.eta!r} must be at least 2")
            check(isinstance(self.recover_steps, int) and self.recover_steps >= 0,
                  f"recover_steps {self.recover_steps!r} must be 0 or more")
        for name in ("n_samples", "streams", "prompt_tokens", "eval_tokens", "rungs", "slice_tokens"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} {value!r} must be at least 1")
        check(bool(self.target or self.max_size or self.max_kl or self.min_decode or self.max_ttft or self.min_throughput),
              "give a target or a budget: --target edge|realtime|cloud, or --max-size 600MB, --max-kl 0.05, "
              "--min-decode 40, --max-ttft 500, --min-throughput 200")

    def budgets(self) -> "Budgets":
        """The budgets this config sets, the target's defaults filled in."""
        size = parse_size(self.max_size) if self.max_size else None
        kl, decode, throughput, maximize = self.max_kl, self.min_decode, self.min_throughput, None
        if self.target == "edge" and size is None and kl is None:
            kl = DEFAULT_KL
        if self.target == "realtime" and decode is None:
            decode = DEFAULT_DECODE
        if self.target == "cloud":
            kl = DEFAULT_KL if kl is None and size is None else kl
            maximize = "streams" if throughput is None else None
        return Budgets(size, kl, decode, None if self.max_ttft is None else self.max_ttft / 1e3, throughput,
                       self.streams, self.prompt_tokens, maximize)


@dataclasses.dataclass(frozen=True)
class Budgets:
    """A plan's budgets in plain units (bytes, nats/token, tokens/s, seconds)."""

    max_bytes: int | None = None
    max_kl: float | None = None
    min_decode: float | None = None
    max_ttft: float | None = None
    min_throughput: float | None = None
    streams: int = 32
    prompt_tokens: int = 128
    maximize: str | None = None  # "streams": the most throughput within the other budgets

    def figures(self) -> dict[str, int]:
        """Speed figures the budgets need (figure -> input rows); decode is always predicted when any is."""
        out = {}
        if self.min_decode or self.max_ttft or self.min_throughput or self.maximize:
            out["decode"] = 1
        if self.max_ttft:
            out["prefill"] = self.prompt_tokens
        if self.min_throughput or self.maximize:
            out["streams"] = self.streams
        return out

    def step_limits(self) -> dict[str, float]:
        """figure -> the most seconds a step may take."""
        out = {}
        if self.min_decode:
            out["decode"] = 1 / self.min_decode
        if self.max_ttft:
            out["prefill"] = self.max_ttft
        if self.min_throughput:
            out["streams"] = self.streams / self.min_throughput
        return out


@dataclasses.dataclass
class Plan:
    sensitivity: Sensitivity
    front: Front  # size / predicted-KL
    point: Totals  # the choice: bytes, predicted KL, Σ layer seconds per figure
    recipe: list[dict[str, Any]]
    options: list[list[Option]] = dataclasses.field(default_factory=list)
    speed: SpeedModel | None = None
    figures: tuple[str, ...] = ()  # the order of point.times
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # measured builds, in order
    groups: list[list[int]] = dataclasses.field(default_factory=list)  # per option row: its layers (indices)
    prefix: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # steps before the allocation's (search)
    prefix_kl: float = 0.0  # their measured KL against the original, on the sensitivity windows
    shapes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # layer -> (n, k)

    def treatments(self) -> dict[str, str]:
        """Layer -> chosen treatment."""
        rows = self.options or self.sensitivity.options()
        groups = self.groups or [[i] for i in range(len(rows))]
        out = {}
        for row, members, j in zip(rows, groups, self.point.choice):
            for i in members:
                out[self.sensitivity.layers[i]] = row[j].name
        return dict(sorted(out.items(), key=lambda kv: self.sensitivity.layers.index(kv[0])))

    def front_rows(self, count: int = 8) -> list[dict[str, str]]:
        """`count` points spread over the size / predicted-KL front: MB, predicted KL and, with a speed
        model, each speed figure predicted for that point (the front's third axis)."""
        from slimlm.planner.speed import storage_format

        points = self.front.points
        shown = sorted({round(k * (len(points) - 1) / (count - 1)) for k in range(count)}) if count > 1 else [0]
        rows = []
        for k in shown:
            row = {"MB": f"{points[k].bytes / 1e6:.4f}", "predicted KL": f"{points[k].loss + self.prefix_kl:.5f}"}
            if self.speed is not None and self.shapes:
                options = self.sensitivity.options()
                for fig in self.figures:
                    seconds = sum(self.speed.layer_time(self.shapes[layer], storage_format(STEPS.get(options[i][j].name)), fig)
                                  for i, (layer, j) in enumerate(zip(self.sensitivity.layers, points[k].choice)))
                    row[f"predicted {fig} s/step"] = f"{seconds:.4g}"
            rows.append(row)
        return rows

    def predicted(self) -> dict[str, float]:
        """figure -> predicted seconds per step of the chosen plan."""
        if self.speed is None:
            return {}
        return dict(zip(self.figures, self.point.times))


def recipe_for(choice: dict[str, str], calibration: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One step per treatment used, its layers named in `include` (data-free steps first); layers
    kept as they are need no step."""
    steps = []
    used = {t for t in choice.values() if t != "keep"}
    for name in sorted(used, key=lambda t: (STEPS[t]["method"] != "rtn", t)):
        step = dict(STEPS[name], include=sorted(layer for layer, t in choice.items() if t == name))
        if step["method"] != "rtn" and calibration:
            step.update(calibration)
        steps.append(step)
    return steps


_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up",
                 "w1": "gate_up", "w3": "gate_up"}


def fused_groups(layers: list[str]) -> list[list[int]]:
    """Layers the engine runs in one call when they share a format (q/k/v, gate/up of one block):
    with a speed budget they are given one treatment, so the plan keeps the fused call the speed
    model measured (a mixed q/k/v runs as three calls)."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(layers):
        parent, _, leaf = name.rpartition(".")
        key = f"{parent.rpartition('.')[0]}:{_SHARED_INPUT[leaf]}" if leaf in _SHARED_INPUT else name
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _with_times(sensitivity: Sensitivity, shapes: dict[str, tuple[int, int]], speed: SpeedModel | None,
                figures: tuple[str, ...]) -> tuple[list[list[Option]], list[list[int]]]:
    """Options per allocation item and each item's layers: one item per layer without speed
    budgets; with them, the fused groups, each option the sum over its layers (with their times)."""
    from slimlm.planner.speed import storage_format

    options = sensitivity.options()
    if speed is None:
        return options, [[i] for i in range(len(options))]
    timed = [[Option(o.name, o.bytes, o.loss, tuple(speed.layer_time(shapes[layer], storage_format(STEPS.get(o.name)), fig)
                                                    for fig in figures)) for o in row]
             for layer, row in zip(sensitivity.layers, options)]
    groups = fused_groups(sensitivity.layers)
    merged = []
    for members in groups:
        common = [o.name for o in timed[members[0]] if all(any(p.name == o.name for p in timed[i]) for i in members)]
        row = []
        for name in common:
            parts = [next(p for p in timed[i] if p.name == name) for i in members]
            row.append(Option(name, sum(p.bytes for p in parts), sum(p.loss for p in parts),
                              tuple(sum(p.times[k] for p in parts) for k in range(len(figures)))))
        merged.append(row)
    return merged, groups


def _choose(options: list[list[Option]], budgets: Budgets, figures: tuple[str, ...],
            limits: dict[str, float]) -> Totals:
    """The allocation for these budgets; infeasible ones get an error in the user's units."""
    from slimlm.core.errors import SlimError
    from slimlm.planner.allocate import solve

    max_times = {k: limits[fig] for k, fig in enumerate(figures) if fig in limits}
    minimize = figures.index(budgets.maximize) if budgets.maximize else None
    try:
        return solve(options, max_bytes=budgets.max_bytes, max_loss=budgets.max_kl, max_times=max_times, minimize=minimize)
    except SlimError:
        pass
    best = [f"the smallest plan is {sum(min(o.bytes for o in row) for row in options) / 1e6:.3f} MB",
            f"the least predicted KL is {sum(min(o.loss for o in row) for row in options):.4g}"]
    for k, fig in enumerate(figures):
        fastest = sum(min(o.times[k] for o in row) for row in options)
        best.append(f"the fastest {_figure_text(fig, fastest, budgets, reached=True)}")
    asked = [f"size {budgets.max_bytes / 1e6:.3f} MB" if budgets.max_bytes else "",
             f"KL {budgets.max_kl:g}" if budgets.max_kl else ""]
    asked += [_figure_text(fig, limits[fig], budgets) for fig in figures if fig in limits]
    raise SlimError(f"no plan meets {' and '.join(a for a in asked if a)}: {'; '.join(best)} (each alone); loosen a budget")


def _figure_text(fig: str, seconds: float, budgets: Budgets, reached: bool = False) -> str:
    if fig == "decode":
        return f"{'decodes' if reached else 'decode'} {1 / seconds:.1f} tok/s at batch 1"
    if fig == "prefill":
        return f"{'reaches the ' if reached else ''}first token in {seconds * 1e3:.0f} ms ({budgets.prompt_tokens}-token prompt)"
    return f"{'gives ' if reached else 'throughput '}{budgets.streams / seconds:.1f} tok/s at {budgets.streams} streams"


def plan(load: Callable[[], nn.Module], tokens: Tensor, max_bytes: int | None = None, calibration: Tensor | None = None,
         gptq: bool = True, gptq_settings: dict[str, Any] | None = None,
         on_layer: Callable[[int, int], None] | None = None, state: str | None = None,
         max_kl: float | None = None, method: str = "fisher", fisher_samples: int = 4,
         budgets: Budgets | None = None, verify: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
         on_step: Callable[[str, int, int], None] | None = None, speed: SpeedModel | None = None,
         prefix: list[dict[str, Any]] | None = None, tokenizer=None) -> Plan:
    """Plan `load()`'s compression within the budgets: `max_bytes` of block linear weights and/or
    `max_kl` (alone: the smallest plan within it), or `budgets` for speed too (then speed is timed on
    this machine, `planner.speed`). tokens (n, T): the sensitivity windows; calibration: token ids
    for the GPTQ treatments (default: `tokens`). state: a JSON file the sensitivity measurement saves
    after every layer and resumes from. speed: a speed model `calibrate` made for this model (else it
    is made when a budget needs it). verify(recipe) -> measured figures (`check.check_plan`): with a speed
    budget, a build that misses it is re-planned with the budget tightened by the measured error.
    prefix: recipe steps run first (read with `tokenizer`), e.g. AWQ's scales folded (`AWQ_SCALES`);
    the plan is made on the model they produce, and the recipe starts with them."""
    import slimlm
    from slimlm.core.errors import SlimError

    budgets = budgets or Budgets(max_bytes=max_bytes, max_kl=max_kl)
    if prefix:  # steps that keep the function (AWQ's folded scales): planned on the model they make
        import copy

        prefixed = slimlm.apply(load(), prefix, tokenizer)
        inner = None if verify is None else (lambda recipe: verify(list(prefix) + recipe))
        result = plan(lambda: copy.deepcopy(prefixed), tokens, max_bytes, calibration=calibration, gptq=gptq,
                      gptq_settings=gptq_settings, on_layer=on_layer, state=state, max_kl=max_kl, method=method,
                      fisher_samples=fisher_samples, budgets=budgets, verify=inner, on_step=on_step, speed=speed)
        result.prefix, result.recipe = list(prefix), list(prefix) + result.recipe
        return result
    base = load()
    extra = {}
    if gptq:
        for k, name in enumerate(GPTQ):
            settings = {k: v for k, v in STEPS[name].items() if k != "method"}
            copy = slimlm.quantize(load(), "gptq", calibration=tokens if calibration is None else calibration,
                                   **settings, **{"head": "float", **(gptq_settings or {})})  # codes of the blocks only
            extra[name] = from_model(copy)
            if on_step:
                on_step("GPTQ treatments", k + 1, len(GPTQ))
    sensitivity = measure_sensitivity(base, tokens, names=["keep"] + RTN, extra=extra, on_layer=on_layer, state=state,
                                      method=method, fisher_samples=fisher_samples)
    front = pareto_front(sensitivity.options())
    figures = budgets.figures()
    from slimlm.planner.sensitivity import block_linears

    shapes = {name: tuple(m.weight.shape) for name, m in block_linears(base).items()}
    del base
    if figures and (speed is None or not set(figures) <= set(speed.rows)):
        from slimlm.planner.speed import calibrate, storage_format

        formats = [storage_format(STEPS.get(t)) for t in sensitivity.treatments]
        speed = calibrate(load, shapes, formats, figures, on_step=on_step)
    speed = speed if figures else None
    names = tuple(figures)
    options, groups = _with_times(sensitivity, shapes, speed, names)
    limits = budgets.step_limits()
    result = Plan(sensitivity, front, _choose(options, budgets, names, limits), [], options, speed, names,
                  groups=groups, shapes=shapes)
    result.recipe = recipe_for(result.treatments(), gptq_settings)
    if verify is None:
        return result
    asked = dict(limits)  # the user's; `limits` is what the allocation is given
    for attempt in range(3):
        measured = verify(result.recipe)
        predicted = result.predicted()
        result.checks.append(dict(measured, predicted=predicted, bytes_planned=result.point.bytes))
        missed = [fig for fig, limit in asked.items() if measured.get(fig, 0) > limit]
        if not missed or attempt == 2:
            break
        # the build ran slower than predicted: give the allocation the budget shrunk by that error
        # (1% more), or, if nothing fits that, the fastest plan within the other budgets; build again
        limits = {fig: asked[fig] * min(1.0, predicted[fig] / measured[fig]) * (0.99 if fig in missed else 1.0)
                  for fig in asked}
        try:
            point = _choose(options, budgets, names, limits)
        except SlimError:
            fastest = dataclasses.replace(budgets, maximize=missed[0])
            try:
                point = _choose(options, fastest, names, {fig: v for fig, v in limits.items() if fig != missed[0]})
            except SlimError:
                break  # the other budgets allow nothing faster: the miss is reported as measured
        if point.choice == result.point.choice:
            break
        result.point = point
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
