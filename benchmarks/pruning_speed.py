"""Decode speed of structurally pruned models against the dense one, on the TinyLlama-shaped random
model of engine_speed.py (bf16 weights, batch 1, the engine): 25% of MLP channels, 25% of attention
heads (two of every eight query heads per key/value head), one block in five, all three together.

    python benchmarks/pruning_speed.py [--layers 22 --threads 2 --repeats 5]

The pruned and the dense model are timed alternately in one process; medians with min-max.
Unstructured and 2:4 sparse models run exactly as fast as dense ones (the zeros are stored and
multiplied like any weight); what a sparse kernel would give is measured on one 5632x2048 layer at
decode (1 row) and prefill (128 rows): PyTorch's CSR sparse matmul against the dense one (CPU has no
2:4 kernel; torch's semi-structured sparsity is CUDA-only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import slimlm
from engine_speed import build  # noqa: E402  (benchmarks/ is the script's folder)
from kernel_speed import median_seconds  # noqa: E402
from slimlm.eval.speed import _Runner

VARIANTS = {
    "channels 25%": [("channels", dict(sparsity=0.25))],
    "heads 25%": [("heads", dict(sparsity=0.25))],
    "blocks 1 of 5": [("blocks", dict(sparsity=0.2))],
    "all three": [("channels", dict(sparsity=0.25)), ("heads", dict(sparsity=0.25)), ("blocks", dict(sparsity=0.2))],
}


@torch.no_grad()
def decode_tps(model, steps: int) -> float:
    runner = _Runner(model, 1, steps + 80, True, "auto")
    tokens = runner.prefill(torch.randint(1, min(200, model.config.vocab_size), (1, 64))).argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.step(tokens).argmax(-1)
    return steps / (time.perf_counter() - t0)


def sparse_layer_times(threads: int, repeats: int = 20) -> None:
    from slimlm.pruning import masks as M

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    w = torch.randn(5632, 2048)
    variants = {"50% unstructured": M.topk_mask(w.abs(), 0.5, per_row=True), "2:4": M.nm_mask(w.abs(), 2, 4)}
    for rows in (1, 128):
        x = torch.randn(rows, 2048)
        dense_ms = _median_ms(lambda: x @ w.t(), repeats)
        for name, mask in variants.items():
            sparse = (w * mask).to_sparse_csr()
            sparse_ms = _median_ms(lambda: torch.sparse.mm(sparse, x.t()), repeats)
            print(f"  {name:<17} {rows:>3} rows: CSR {sparse_ms:.3f} ms, dense fp32 {dense_ms:.3f} ms "
                  f"({dense_ms / sparse_ms:.2f}x)", flush=True)


def _median_ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-only", action="store_true", help="only the sparse-kernel measurement on one layer")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("sparse kernels on one 5632x2048 layer:")
    sparse_layer_times(args.threads)
    if args.layer_only:
        return
    dense = build(args.layers)
    slimlm.quantize(dense, "cast", dtype="bfloat16")
    params = sum(x.numel() for x in dense.parameters())
    calib = torch.randint(1, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    print(f"{args.layers} layers, bf16, {params / 1e9:.2f}B parameters, threads {args.threads}")
    print(f"{'variant':<16} {'params':>7} {'pruned tok/s':>20} {'dense tok/s':>20} {'speed-up':>9}")
    for name, steps in VARIANTS.items():
        model = copy.deepcopy(dense)
        for method, settings in steps:
            slimlm.prune(model, method, calibration=calib, **settings)
        kept = sum(x.numel() for x in model.parameters()) / params
        decode_tps(model, 4), decode_tps(dense, 4)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(decode_tps(model, args.steps))
            theirs.append(decode_tps(dense, args.steps))
        fmt = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"  # noqa: E731
        print(f"{name:<16} {100 * kept:>6.0f}% {fmt(ours):>20} {fmt(theirs):>20} "
              f"{statistics.median(ours) / statistics.median(theirs):>8.2f}x", flush=True)
        del model


if __name__ == "__main__":
    main()
