"""The pipeline bubble measured: PP=2 (one thread per stage) decoding 1, 4 and 16 streams of a
TinyLlama-1.1B-shaped model; the share of each decode step the first stage spends idle (waiting for
the logits of the last stage), against GPipe's (p - 1) / (m + p - 1), for 1, 2 and 4 micro-batches.
Decoding is bandwidth-bound and every micro-batch reads its stage's weights again, so more
micro-batches shrink the bubble but cost reads: the default (as many micro-batches as stages) is
the trade-off this measures.

    python benchmarks/pipeline_bubble.py [--layers 22 --variant int4 --steps 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import slimlm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--variant", default="int4")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--micro-batches", default="1,2,4", help="micro-batch counts tried at each stream count (<= streams)")
    args = p.parse_args()
    from parallel_speed import build

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        path = build(args.layers, args.variant, Path(scratch))
        print(f"PP=2, {args.variant}, {args.layers} layers, {args.steps} decode steps after a 64-token prompt per stream")
        print(f"{'streams':>7} {'micro-batches':>13} {'tok/s':>8} {'stage 0 idle':>13} {'GPipe bubble':>13}")
        for wanted in [int(m) for m in args.micro_batches.split(",")]:
            model, _ = slimlm.load(path, pp=2, micro_batches=wanted)  # every stage must split alike
            group = model.slimlm_parallel
            for streams in [int(s) for s in args.streams.split(",")]:
                if wanted > streams:
                    continue
                engine = group.engine(slots=streams, max_len=64 + args.steps + 2)
                tokens = torch.stack([engine.prefill(s, torch.randint(0, 1000, (64,))).argmax(-1) for s in range(streams)])
                slots = torch.arange(streams)
                runner = engine.local
                runner.busy = runner.waiting = 0.0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tokens = engine.decode(slots, tokens).argmax(-1)
                wall = time.perf_counter() - t0
                idle = 1 - runner.busy / wall
                print(f"{streams:>7} {wanted:>13} {streams * args.steps / wall:>8.1f} {100 * idle:>12.0f}% "
                      f"{100 * (runner.stages - 1) / (wanted + runner.stages - 1):>12.0f}%", flush=True)
                engine.close()
            group.close()


if __name__ == "__main__":
    main()
