"""Where a decode step's time goes: the weight matmuls alone (every linear layer of the model called
once with a decode-shaped input, in order), the engine's fused step, its PyTorch step and
transformers' forward, at 1 and 2 threads, on the TinyLlama-shaped model of engine_speed.py.

    python benchmarks/decode_breakdown.py [--variant "int4 g32 +head" --batch 1 --threads 1,2]

"weights" is the floor the kernels set; "fused - weights" is the glue left (norms, RoPE, attention,
Python); the 1-vs-2-thread ratio of each says how well it scales. GB/s counts the weight bytes a step
reads; "% bw" is against the read bandwidth measured right before, with the same threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import slimlm
from slimlm.eval.speed import _Runner, decode_bytes_per_step, measure_bandwidth

from engine_speed import VARIANTS, apply_variant, build  # noqa: E402  (benchmarks/ is the script's folder)


def linear_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) or hasattr(m, "scheme")]


@torch.no_grad()
def weights_seconds(layers: list[nn.Module], batch: int, dtype: torch.dtype) -> float:
    xs = {k: torch.randn(batch, k).to(dtype) for k in {layer.in_features for layer in layers}}
    t0 = time.perf_counter()
    for layer in layers:
        layer(xs[layer.in_features])
    return time.perf_counter() - t0


@torch.no_grad()
def step_seconds(runner: _Runner, tokens: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(tokens).argmax(-1)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="int4 g32 +head", choices=list(VARIANTS))
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    model = build(args.layers)
    apply_variant(model, args.variant)
    dtype = next(model.parameters()).dtype
    nbytes = decode_bytes_per_step(model)
    layers = linear_layers(model)
    ids = torch.randint(0, 32000, (args.batch, 64), generator=torch.Generator().manual_seed(0))
    max_len = 64 + args.repeats * args.steps + 8
    runners = {"fused": _Runner(model, args.batch, max_len, True, "auto"),
               "pytorch": _Runner(model, args.batch, max_len, True, "auto", fused_step=False),
               "transformers": _Runner(model, args.batch, 0, False, "auto")}
    print(f"{args.variant}, batch {args.batch}, {args.layers} layers, {nbytes / 1e6:.0f} MB of weights per step")
    print(f"{'threads':>7} {'bw GB/s':>8} {'weights ms':>11} {'GB/s':>6} {'% bw':>5} {'fused ms':>9} {'glue ms':>8} "
          f"{'pytorch ms':>11} {'transformers ms':>16} {'fused tok/s':>12}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        bw = measure_bandwidth()
        tokens = {name: r.prefill(ids).argmax(-1) for name, r in runners.items()}
        weights_seconds(layers, args.batch, dtype)
        times: dict[str, list[float]] = {"weights": [], **{name: [] for name in runners}}
        for _ in range(args.repeats):  # interleaved
            times["weights"].append(weights_seconds(layers, args.batch, dtype))
            for name, runner in runners.items():
                times[name].append(step_seconds(runner, tokens[name], args.steps))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        gbps = nbytes / med["weights"] / 1e6
        print(f"{threads:>7} {bw:>8.1f} {med['weights']:>11.2f} {gbps:>6.1f} {100 * gbps / bw:>4.0f}% {med['fused']:>9.2f} "
              f"{med['fused'] - med['weights']:>8.2f} {med['pytorch']:>11.2f} {med['transformers']:>16.2f} "
              f"{args.batch * 1e3 / med['fused']:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
