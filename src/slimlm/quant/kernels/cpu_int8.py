"""int8 weight-only matmul on CPU through ATen's `_weight_int8pack_mm` (per-channel scales).

The op computes x @ (q * s)^T for signed int8 q. An asymmetric zero point z (codes u = q + 128)
adds a rank-1 term: x @ ((u - z) s)^T = x @ (q s)^T + rowsum(x) ⊗ ((128 - z) s).

Precision: the op is fast only with bfloat16 activations (20-50x slower with float32 or float16
here, see benchmarks/kernels.py), so activations are rounded to bfloat16 and the result is cast
back; the reference kernel is the exact float32 path. From `dense_rows` rows on (prefill), the
weight is dequantized to bfloat16 and multiplied by a dense GEMM, which beats the GEMV-style op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase

COMPUTE = torch.bfloat16
ALIGN = 64  # bytes


class CpuInt8Kernel(KernelBase):
    name = "cpu_int8"
    dense_rows = 64  # measured crossover, benchmarks/kernels.py

    def supports(self, layer, device: torch.device) -> bool:
        if layer.slimlm_kind != "quantized_linear":
            return False
        per_channel = layer.scale.shape[1] == 1
        # K % 16: with bf16 activations the op crashes or returns garbage otherwise (torch 2.13)
        return (device.type == "cpu" and layer.scheme.format == "int" and layer.scheme.bits == 8 and per_channel
                and layer.in_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"))

    def prepare(self, layer, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        if layer.qweight.data_ptr() % ALIGN:
            # Weights memory-mapped from safetensors sit at arbitrary offsets, and the op's bf16 path
            # crashes on unaligned weights (torch 2.13, M >= 17). Move them once into aligned memory.
            layer.qweight = layer.qweight.clone()
        scale = layer.scale[:, 0].to(COMPUTE)  # (N,)
        shift = None
        if layer.zero is not None:
            shift = ((128 - layer.zero[:, 0].float()) * layer.scale[:, 0].float()).to(COMPUTE)  # (N,)
        return scale, shift

    def dense_weight(self, layer, state) -> Tensor:
        """The weight (N, K) in bfloat16: q * s (+ the zero-point shift)."""
        scale, shift = state
        w = layer.qweight.to(COMPUTE) * scale[:, None]
        return w + shift[:, None] if shift is not None else w

    def run(self, x: Tensor, layer, state) -> Tensor:
        scale, shift = state
        xin = x.to(COMPUTE).contiguous()  # (M, K)
        if xin.shape[0] >= self.dense_rows:
            return F.linear(xin, self.dense_weight(layer, state)).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(xin, layer.qweight, scale)  # (M, N)
        if shift is not None:
            y = y + xin.sum(-1, keepdim=True) * shift
        return y.to(x.dtype)


CPU_INT8 = CpuInt8Kernel()
