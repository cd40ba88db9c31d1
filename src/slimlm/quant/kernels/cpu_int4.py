"""int4 grouped weight-only matmul on CPU through ATen's `_weight_int4pack_mm_for_cpu`.

The op ("tinygemm" layout) computes x @ W^T with W = (q - 8) * s + m per group, where m is a
floating-point offset. Our codes use an integer zero point z: (q - z) s = (q - 8) s + (8 - z) s,
so m = (8 - z) s. Needs N % 16 == 0, an even K, and a group size that divides K.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.quant.primitives import group_size_for
from slimlm.quant.scheme import GROUP_SIZES

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuInt4Kernel:
    name = "cpu_int4"

    def supports(self, layer, device: torch.device) -> bool:
        g = group_size_for(layer.in_features, layer.scheme)
        return (
            device.type == "cpu"
            and layer.scheme.bits == 4
            and layer.out_features % 16 == 0
            and layer.in_features % g == 0
            and layer.in_features % 2 == 0
            and g in GROUP_SIZES
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def prepare(self, layer, dtype: torch.dtype) -> tuple[Tensor, int, Tensor, torch.dtype]:
        dtype = dtype if dtype in DTYPES else torch.float32
        codes = layer.codes().to(torch.int32)  # (N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = layer.scale.float()  # (N, G)
        offset = (8 - layer.zero_points().float()) * scale  # (N, G)
        scale_and_zero = torch.stack([scale, offset], -1).transpose(0, 1).contiguous().to(dtype)  # (G, N, 2)
        group = group_size_for(layer.in_features, layer.scheme)
        return packed, group, scale_and_zero, dtype

    def run(self, x: Tensor, layer, state) -> Tensor:
        packed, group, scale_and_zero, dtype = state
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype).contiguous(), packed, group, scale_and_zero)
        return y.to(x.dtype)


KERNEL = CpuInt4Kernel()
