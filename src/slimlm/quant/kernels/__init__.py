"""Kernel registry for QuantizedLinear.

A kernel has a `name`, `supports(layer, device)`, `prepare(layer, dtype)` (repack once; returns
the state it needs) and `run(x, layer, state)` for x (M, K) -> (M, N) without bias. Automatic
choice tries `PRIORITY` in order; `reference` supports everything and is the oracle.
"""

from __future__ import annotations

import torch

from slimlm.core.errors import SlimError
from slimlm.core.registry import Registry

KERNELS: Registry = Registry("kernel")
PRIORITY = ("cuda_int4", "cuda_int8", "cpu_int4_avx512", "cpu_int4", "cpu_int8_avx512", "cpu_int8", "cpu_fp8", "reference")  # cpu_*_a8: on request only


def _register_builtin() -> None:
    if KERNELS.names():
        return
    from slimlm.quant.kernels import cpu_avx512, cpu_fp8, cpu_int4, cpu_int8, cuda, reference

    for kernel in (reference.KERNEL, cpu_int8.KERNEL, cpu_int4.KERNEL, cpu_fp8.KERNEL, *cpu_avx512.KERNELS, *cuda.KERNELS):
        KERNELS.register(kernel.name)(kernel)


def kernel_names() -> list[str]:
    _register_builtin()
    return KERNELS.names()


def get_kernel(name: str):
    _register_builtin()
    return KERNELS.get(name)


def choose_kernel(layer, device: torch.device, name: str | None = None):
    """The named kernel (an error if it cannot run this layer), else the first in PRIORITY that can."""
    _register_builtin()
    if name is not None:
        kernel = KERNELS.get(name)
        if not kernel.supports(layer, device):
            raise SlimError(
                f"kernel '{name}' cannot run a {layer.scheme.label()} layer of shape "
                f"({layer.out_features}, {layer.in_features}) on {device}; use 'reference' or let slimlm choose"
            )
        return kernel
    for candidate in PRIORITY:
        kernel = KERNELS.get(candidate)
        if kernel.supports(layer, device):
            return kernel
    raise AssertionError("the reference kernel supports every layer")
