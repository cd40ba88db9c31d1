"""int4 grouped weight-only matmul on CPU through ATen's `_weight_int4pack_mm_for_cpu`.

The op ("tinygemm" layout) computes x @ W^T with W = (q - 8) * s + m per group, where m is a
floating-point offset. Our codes use an integer zero point z: (q - z) s = (q - 8) s + (8 - z) s,
so m = (8 - z) s. Needs N % 16 == 0, an even K, and a group size that divides K.

Precision: as for int8, the op is fast only with bfloat16 activations, so activations are rounded
to bfloat16 and the result cast back (the reference kernel is the exact float32 path). From
`dense_rows` rows on (prefill), the weight is dequantized to bfloat16 for a dense GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase
from slimlm.quant.primitives import group_size_for
from slimlm.quant.scheme import GROUP_SIZES

COMPUTE = torch.bfloat16
DENSE_ROWS = 128  # measured crossover of op vs dequantize + GEMM at 2048x2048, benchmarks/kernels.py


class CpuInt4Kernel(KernelBase):
    name = "cpu_int4"
    dense_rows = DENSE_ROWS

    def supports(self, layer, device: torch.device) -> bool:
        if layer.slimlm_kind != "quantized_linear":
            return False
        g = group_size_for(layer.in_features, layer.scheme)
        return (
            device.type == "cpu"
            and layer.scheme.format == "int"  # the op reads uniform integer codes only
            and layer.scheme.bits == 4
            and layer.out_features % 16 == 0
            and layer.in_features % g == 0
            and layer.in_features % 2 == 0
            and g in GROUP_SIZES
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def prepare(self, layer, dtype: torch.dtype) -> tuple[Tensor, int, Tensor, Tensor, Tensor]:
        codes = layer.codes().to(torch.int32)  # (N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return (packed, *tinygemm_params(layer))

    def dense_weight(self, layer, state) -> Tensor:
        _, group, _, scale, zero = state
        return dense_from_nibbles(layer, group, scale, zero)

    def run(self, x: Tensor, layer, state) -> Tensor:
        packed, group, scale_and_zero = state[:3]
        xin = x.to(COMPUTE).contiguous()  # (M, K)
        if xin.shape[0] >= self.dense_rows:
            return F.linear(xin, self.dense_weight(layer, state)).to(x.dtype)
        return self.matmul(xin, packed, group, scale_and_zero).to(x.dtype)

    @staticmethod
    def matmul(xin: Tensor, packed: Tensor, group: int, scale_and_zero: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xin, packed, group, scale_and_zero)


def tinygemm_params(layer) -> tuple[int, Tensor, Tensor, Tensor]:
    """(group, scale_and_zero (G, N, 2) for the tinygemm ops, and the dense path's scale and zero
    point per group, (N, G, 1) each in bfloat16)."""
    scale = layer.scale.float()  # (N, G)
    zero = layer.zero_points().float()  # (N, G)
    offset = (8 - zero) * scale
    scale_and_zero = torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(COMPUTE)  # (G, N, 2)
    group = group_size_for(layer.in_features, layer.scheme)
    return group, scale_and_zero, scale.to(COMPUTE)[..., None], zero.to(COMPUTE)[..., None]


def dense_from_nibbles(layer, group: int, scale: Tensor, zero: Tensor) -> Tensor:
    """The weight (N, K) in bfloat16 from the portable nibbles: (q - z) * s with scale and zero (N, G, 1)
    in bfloat16 (q - z is exact in bfloat16, so the product is rounded once)."""
    n, k = layer.out_features, layer.in_features
    low, high = layer.qweight & 0x0F, layer.qweight >> 4  # (N, K/2) each: even and odd columns
    q = torch.stack([low, high], -1).view(n, k // group, group).to(COMPUTE)  # (N, G, g)
    return ((q - zero) * scale).view(n, k)


CPU_INT4 = CpuInt4Kernel()
