"""Weight-only matmul kernels at decode and prefill shapes: median time and achieved GB/s.

    python benchmarks/kernel_speed.py [--n 2048 --k 2048 --m 1,8,128 --threads 2]

Prints one row per (kernel, M): the dense fp32/bf16 matmul, each QuantizedLinear kernel that
supports the scheme (int8, int4, fp8 e4m3, log4), and the W8A8 (SmoothQuant) kernels, with the ratio
to dense fp32 measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import QuantScheme
from slimlm.quant.w8a8 import W8A8Linear


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--m", default="1,8,16,32,128")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lin = nn.Linear(args.k, args.n, bias=False)
    cases = [("fp32 dense", None, None, torch.float32), ("bf16 dense", None, None, torch.bfloat16)]
    for scheme in (QuantScheme(bits=8, group_size=None, symmetric=True), QuantScheme(bits=4, group_size=32),
                   QuantScheme(bits=4, group_size=128), QuantScheme(bits=8, group_size=None, symmetric=True, format="fp8"),
                   QuantScheme(bits=4, group_size=32, symmetric=True, format="log")):
        layer = QuantizedLinear.from_float(lin, scheme)
        for kernel in ("reference", "cpu_int8", "cpu_int4", "cpu_fp8", "cpu_int4_avx512", "cpu_int4_a8", "cpu_int8_a8"):
            from slimlm.quant.kernels import get_kernel

            if get_kernel(kernel).supports(layer, torch.device("cpu")):
                cases.append((f"{scheme.label()} {kernel}", layer, kernel, torch.float32))
                if kernel != "reference":  # the ATen op alone, without the dense path for many rows
                    cases.append((f"{scheme.label()} {kernel} op-only", layer, kernel + "!", torch.float32))
    w8a8 = W8A8Linear.from_float(lin)
    for kernel in ("reference", "w8a8_int_mm"):
        cases.append((f"w8a8 {kernel or 'auto'}", w8a8, ("w8a8", kernel), torch.float32))
    print(f"N={args.n} K={args.k} threads={torch.get_num_threads()}  (median of {args.repeats})")
    print(f"{'kernel':<32} {'M':>5} {'ms':>9} {'GB/s':>7} {'vs fp32':>8}")
    for m in [int(v) for v in args.m.split(",")]:
        base = None
        for name, layer, kernel, dtype in cases:
            x = torch.randn(m, args.k, dtype=dtype)
            saved = None
            if layer is None:
                w = lin.weight.detach().to(dtype)
                fn, nbytes = (lambda x=x, w=w: x @ w.t()), w.numel() * w.element_size()
            elif isinstance(kernel, tuple):
                layer.set_kernel_(kernel[1])
                fn, nbytes = (lambda x=x, layer=layer: layer(x)), layer.storage_bytes()
            else:
                from slimlm.quant.kernels import get_kernel

                op_only = kernel.endswith("!")
                impl = get_kernel(kernel.rstrip("!"))
                saved = getattr(impl, "dense_rows", None)
                if op_only:
                    impl.dense_rows = 1 << 30
                layer.set_kernel_(kernel.rstrip("!"))
                fn, nbytes = (lambda x=x, layer=layer: layer(x)), layer.storage_bytes()
            with torch.no_grad():
                s = median_seconds(fn, args.repeats)
            if saved is not None:
                impl.dense_rows = saved
            base = base or s
            print(f"{name:<32} {m:>5} {1e3 * s:>9.3f} {nbytes / s / 1e9:>7.1f} {base / s:>7.2f}x")


if __name__ == "__main__":
    main()
