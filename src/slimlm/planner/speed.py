"""Predicting a plan's speed on this machine, from timings taken here, and checking it.

A step of the engine costs, per speed figure (batch-1 decode, prefill of the prompt, decode at N
streams), a sum over the block linear layers

    seconds = Σ_layers b(format) · t(layer shape, format, rows)

t: the measured time of one layer of that shape and format, run by the kernel slimlm chooses for
it, on `rows` input rows (1, the prompt, N). For few rows the layer is one of enough copies that the
weights come from memory, as in a real step, not from the cache a repeated call would leave them
in. b: the whole uniform model of that format measured on the engine (`eval.speed.measure_speed`)
over the sum of its isolated layer timings (`calibrate`), so that the parts no compression touches
and what isolated timings miss are spread over the layers. Isolated timings alone mislead: on the
demo model an int4 layer alone is slower than a float one, yet the int4 model decodes faster.
Because a step is a sum over the layers, a speed budget is a budget on that sum, which the
allocation (`allocate.solve`) handles like a size budget. `check.check_plan` then builds the chosen
model and measures it: the prediction is a guide; the measurement is what the planner reports
and holds to.

Why not bytes read per token over the measured bandwidth: it is wrong where it matters. int3 and
int2 layers have no fast kernel (they dequantize and multiply), so they store fewer bytes and run
far slower than int4.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

FIGURES = ("decode", "prefill", "streams")  # batch-1 decode step, prompt prefill, decode at N streams
KEEP = "keep"


def storage_format(step: dict | None) -> tuple:
    """What a layer's speed depends on: (bits, group size, symmetric), or ('keep',) for a float layer."""
    if step is None:
        return (KEEP,)
    return (step["bits"], step["group_size"], step["symmetric"])


def _make_layer(fmt: tuple, n: int, k: int, dtype: torch.dtype, seed: int) -> nn.Module:
    from slimlm.quant.linear import QuantizedLinear
    from slimlm.quant.scheme import QuantScheme

    layer = nn.Linear(k, n, bias=False, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    if fmt[0] == KEEP:
        return layer.to(dtype)
    bits, group, symmetric = fmt
    return QuantizedLinear.from_float(layer, QuantScheme(bits=bits, group_size=group, symmetric=symmetric)).to(dtype)


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def time_layer(fmt: tuple, n: int, k: int, rows: int, dtype: torch.dtype, working_set: int,
               repeats: int = 3) -> float:
    """Median seconds of one (n, k) layer of format `fmt` on `rows` input rows; for up to 8 rows it
    is one of enough copies to span `working_set` bytes (at most 64), so its weights stream from memory."""
    first = _make_layer(fmt, n, k, dtype, seed=n * 7 + k)
    count = max(1, min(64, math.ceil(working_set / max(1, _module_bytes(first))))) if rows <= 8 else 1
    layers = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    for m in layers:  # first calls: kernel choice, repacking
        m(x)
    rounds = max(repeats, math.ceil(8 / count))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for m in layers:
            m(x)
        times.append((time.perf_counter() - t0) / count)
    return statistics.median(times)


@dataclasses.dataclass
class SpeedModel:
    """Per (shape, format, figure) layer seconds and per figure and format the scale b; a step's
    predicted seconds are the sum of its layers' `layer_time`."""

    rows: dict[str, int]  # figure -> input rows of a layer
    layer_seconds: dict[tuple, float]  # ((n, k), format, figure) -> seconds
    scale: dict[str, dict[tuple, float]]  # figure -> format -> b
    reference: dict[str, dict[str, float]]  # uniform model ("original", "int4 g32", ...) -> figure -> measured s/step
    fitted: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # the same, as the model predicts them

    def layer_time(self, shape: tuple[int, int], fmt: tuple, figure: str) -> float:
        """A layer's share of a step (what the allocation sums): b · t for a format measured as a whole
        model; for one without a fast kernel, the float layer's share plus the extra time isolated
        timing sees over the float layer."""
        shape = tuple(shape)
        t = self._seconds(shape, fmt, figure)
        if fmt in self.scale[figure]:
            return self.scale[figure][fmt] * t
        keep = self._seconds(shape, (KEEP,), figure)
        return self.scale[figure][(KEEP,)] * keep + max(0.0, t - keep)

    def _seconds(self, shape: tuple[int, int], fmt: tuple, figure: str) -> float:
        """The timed layer, or for a shape not timed (a structurally pruned layer) the timed shape of
        the nearest size in that format scaled by the weights' ratio (the layers stream their weights)."""
        if (shape, fmt, figure) in self.layer_seconds:
            return self.layer_seconds[(shape, fmt, figure)]
        timed = [(s, t) for (s, f, g), t in self.layer_seconds.items() if f == fmt and g == figure]
        if not timed:
            raise KeyError((shape, fmt, figure))
        area = shape[0] * shape[1]
        near, t = min(timed, key=lambda st: (abs(math.log(st[0][0] * st[0][1] / area)), st[0]))
        return t * area / (near[0] * near[1])


def measured_seconds(model: nn.Module, figures: dict[str, int], prompt_tokens: int, new_tokens: int = 64) -> dict[str, float]:
    """Seconds per step of `model` on slimlm's engine, per figure (decode: batch 1; prefill: the whole
    prompt; streams: one step of figures['streams'] sequences)."""
    from slimlm.eval.speed import BenchSettings, measure_speed

    batches = (1,) + ((figures["streams"],) if "streams" in figures else ())
    result = measure_speed(model, BenchSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch_sizes=batches,
                                                repeats=5, warmup=1))
    out = {"decode": 1 / result.decode_tps[1], "prefill": result.ttft_ms / 1e3}
    if "streams" in figures:
        n = figures["streams"]
        out["streams"] = n / result.decode_tps[n]
    return out


def has_fast_kernel(fmt: tuple) -> bool:
    """A kernel other than `reference` (dequantize, then multiply) runs this format here."""
    from slimlm.quant.kernels import choose_kernel

    if fmt[0] == KEEP:
        return True
    layer = _make_layer(fmt, 64, 256, torch.float32, seed=0)
    return choose_kernel(layer, torch.device("cpu")).name != "reference"


def calibrate(load: Callable[[], nn.Module], shapes: dict[str, tuple[int, int]], formats: list[tuple],
              figures: dict[str, int], on_step: Callable[[str, int, int], None] | None = None,
              new_tokens: int = 64) -> SpeedModel:
    """Time every (shape, format, figure) here, then measure the original model and, for every format
    with a fast kernel, the model with all its layers in that format, in full. b(format) = the
    uniform model's step / its layers' isolated sum, so the model predicts every uniform model
    exactly and a mix by each layer's share of its format's uniform step: the parts no compression
    touches (attention, norms, head, the engine's glue) are spread over the layers, and what
    isolated timings miss (the engine's fused q/k/v and gate/up calls, its C++ step, Python's call
    overhead, which dominates small layers) is carried by b. Formats without a fast kernel (int3,
    int2: dequantize, then multiply) are not run whole (they are slow): a layer costs the float
    layer's share plus its extra isolated time. shapes: layer name -> (n, k); figures: name -> rows."""
    import slimlm
    from slimlm.core.layers import float_dtype

    model = load()
    dtype = float_dtype(model)
    formats = list(dict.fromkeys([(KEEP,)] + list(formats)))
    distinct = sorted(set(shapes.values()))
    jobs = [(shape, fmt, fig) for fig in figures for fmt in formats for shape in distinct]
    layer_seconds: dict[tuple, float] = {}
    for done, (shape, fmt, fig) in enumerate(jobs):
        working = min(256 * 2**20, sum(_layer_bytes(s, fmt, dtype) for s in shapes.values()))  # 8x this L3, at most
        layer_seconds[(shape, fmt, fig)] = time_layer(fmt, shape[0], shape[1], figures[fig], dtype, working)
        if on_step:
            on_step("timing layers", done + 1, len(jobs))

    def layer_sum(fmt: tuple, fig: str) -> float:
        return sum(layer_seconds[(s, fmt, fig)] for s in shapes.values())

    prompt = figures.get("prefill", 128)
    fast = [f for f in formats if f[0] != KEEP and has_fast_kernel(f)]
    total = 1 + len(fast)
    reference = {"original": measured_seconds(model, figures, prompt, new_tokens)}
    del model
    if on_step:
        on_step("timing whole models", 1, total)
    scale: dict[str, dict[tuple, float]] = {fig: {(KEEP,): reference["original"][fig] / layer_sum((KEEP,), fig)}
                                            for fig in figures}
    labels = {(KEEP,): "original"}
    for done, fmt in enumerate(fast):
        bits, group, symmetric = fmt
        label = f"int{bits}" + (f" g{group}" if group else "") + (" sym" if symmetric and bits != 8 else "")
        labels[fmt] = label
        uniform = slimlm.quantize(load(), "rtn", bits=bits, group_size=group, symmetric=symmetric, head="float")
        reference[label] = measured_seconds(uniform, figures, prompt, new_tokens)
        del uniform
        for fig in figures:
            scale[fig][fmt] = reference[label][fig] / layer_sum(fmt, fig)
        if on_step:
            on_step("timing whole models", done + 2, total)
    result = SpeedModel(dict(figures), layer_seconds, scale, reference)
    for fmt, label in labels.items():
        result.fitted[label] = {fig: sum(result.layer_time(s, fmt, fig) for s in shapes.values()) for fig in figures}
    return result


def _layer_bytes(shape: tuple[int, int], fmt: tuple, dtype: torch.dtype) -> int:
    n, k = shape
    if fmt[0] == KEEP:
        return n * k * torch.tensor([], dtype=dtype).element_size()
    bits, group, symmetric = fmt
    return n * k * bits // 8 + n * math.ceil(k / (group or k)) * (2 + (0 if symmetric else 1))
