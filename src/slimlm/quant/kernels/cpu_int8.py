"""int8 weight-only matmul on CPU through ATen's `_weight_int8pack_mm` (per-channel scales).

The op computes x @ (q * s)^T for signed int8 q. An asymmetric zero point z (codes u = q + 128)
adds a rank-1 term: x @ ((u - z) s)^T = x @ (q s)^T + rowsum(x) ⊗ ((128 - z) s).
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CpuInt8Kernel:
    name = "cpu_int8"

    def supports(self, layer, device: torch.device) -> bool:
        per_channel = layer.scale.shape[1] == 1
        return device.type == "cpu" and layer.scheme.bits == 8 and per_channel and hasattr(
            torch.ops.aten, "_weight_int8pack_mm"
        )

    def prepare(self, layer, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, torch.dtype]:
        dtype = dtype if dtype in DTYPES else torch.float32
        scale = layer.scale[:, 0].to(dtype)  # (N,)
        shift = None
        if layer.zero is not None:
            shift = ((128 - layer.zero[:, 0].float()) * layer.scale[:, 0].float()).to(dtype)  # (N,)
        return scale, shift, dtype

    def run(self, x: Tensor, layer, state) -> Tensor:
        scale, shift, dtype = state
        xin = x.to(dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xin, layer.qweight, scale)  # (M, N)
        if shift is not None:
            y = y + xin.sum(-1, keepdim=True) * shift
        return y.to(x.dtype)


KERNEL = CpuInt8Kernel()
