"""The kernel table for compressed linear layers (see `base.Kernel` for what a kernel is).

Built-in kernels are listed here, by name, and loaded on first use; users add theirs with
`KERNELS.register(name, kernel)`. Automatic choice tries the kernels users registered first, then
the built-ins of the layer's kind in `PRIORITY` order; `reference` runs every layer (the layer's own
`reference_matmul`) and is the oracle the fast kernels are tested against.
"""

from __future__ import annotations

import torch

from slimlm.core.errors import SlimError
from slimlm.core.registry import Registry
from slimlm.quant.kernels.base import Kernel, KernelBase

__all__ = ["KERNELS", "PRIORITY", "Kernel", "KernelBase", "choose_kernel", "get_kernel", "kernel_names"]

KERNELS: Registry[Kernel] = Registry("kernel", builtins={
    "reference": "slimlm.quant.kernels.reference:REFERENCE",
    "cpu_int8": "slimlm.quant.kernels.cpu_int8:CPU_INT8",
    "cpu_int4": "slimlm.quant.kernels.cpu_int4:CPU_INT4",
    "cpu_fp8": "slimlm.quant.kernels.cpu_fp8:CPU_FP8",
    "cpu_int4_avx512": "slimlm.quant.kernels.cpu_avx512:CPU_INT4_AVX512",
    "cpu_int4_a8": "slimlm.quant.kernels.cpu_avx512:CPU_INT4_A8",
    "cpu_int8_avx512": "slimlm.quant.kernels.cpu_avx512:CPU_INT8_AVX512",
    "cpu_int8_a8": "slimlm.quant.kernels.cpu_avx512:CPU_INT8_A8",
    "cpu_int8_a16": "slimlm.quant.kernels.cpu_avx512:CPU_INT8_A16",
    "cuda_int4": "slimlm.quant.kernels.cuda:CUDA_INT4",
    "cuda_int8": "slimlm.quant.kernels.cuda:CUDA_INT8",
    "w8a8_int_mm": "slimlm.quant.kernels.w8a8:W8A8_INT_MM",
})

# Automatic choice per layer kind, fastest first. int4 on CPU: int8 activations (cpu_int4_a8, llama.cpp's Q4_0 x Q8_0
# arithmetic; no repacked copy; +1-2% KL on the demo model). int8 on CPU: int16 activations (cpu_int8_a16; no repacked
# copy, as fast as the bf16 kernel on its copy and more exact); cpu_int8_a8 only on request (it triples int8's small KL)
PRIORITY = {
    "quantized_linear": ("cuda_int4", "cuda_int8", "cpu_int4_a8", "cpu_int4_avx512", "cpu_int4", "cpu_int8_a16",
                         "cpu_int8_avx512", "cpu_int8", "cpu_fp8", "reference"),
    "w8a8_linear": ("w8a8_int_mm", "reference"),
}


def kernel_names() -> list[str]:
    return KERNELS.names()


def get_kernel(name: str) -> Kernel:
    return KERNELS.get(name)


def choose_kernel(layer, device: torch.device, name: str | None = None) -> Kernel:
    """The named kernel (an error if it cannot run this layer), else the first that can: kernels users
    registered, then the built-ins of the layer's kind in PRIORITY order."""
    if name is not None:
        kernel = KERNELS.get(name)
        if not kernel.supports(layer, device):
            raise SlimError(
                f"kernel '{name}' cannot run a {layer.scheme.label()} layer of shape "
                f"({layer.out_features}, {layer.in_features}) on {device}; use 'reference' or let slimlm choose"
            )
        return kernel
    users = [n for n in KERNELS.names() if n not in KERNELS.builtins]
    for candidate in users + list(PRIORITY.get(layer.slimlm_kind, ())):
        kernel = KERNELS.get(candidate)
        if kernel.supports(layer, device):
            return kernel
    raise SlimError(f"no kernel can run a {layer.slimlm_kind} layer on {device}; register one for this layer kind")
