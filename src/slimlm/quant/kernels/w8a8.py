"""Kernels for W8A8Linear (int8 weights per channel, int8 activations per token; see quant/w8a8.py).

  w8a8_int_mm     `torch._int_mm`, int8 x int8 -> int32 accumulated exactly, then both scales; on CPU
                  3.8x faster than a float32 matmul at one row and 7x at 512 rows for a 2048x2048
                  layer (benchmarks/kernels.py). CUDA's `_int_mm` needs more than 16 rows and
                  dimensions divisible by 8: fewer rows are padded, other shapes use the reference.
The oracle is the `reference` kernel (`W8A8Linear.reference_matmul`: both operands dequantized,
multiplied in float32); both quantize the activations with `quantize_rows`, so they differ only by
float32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes (M, K) and float32 scales (M, 1) of each row of x (M, K)."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8IntMMKernel(KernelBase):
    name = "w8a8_int_mm"

    def supports(self, layer, device: torch.device) -> bool:
        if layer.slimlm_kind != "w8a8_linear":
            return False
        return device.type == "cpu" or (device.type == "cuda" and layer.in_features % 8 == 0
                                        and layer.out_features % 8 == 0)

    def prepare(self, layer, dtype: torch.dtype) -> None:
        return None

    def run(self, x: Tensor, layer, state: None) -> Tensor:
        q, sx = quantize_rows(x)  # (M, K) int8, (M, 1)
        m = q.shape[0]
        if q.device.type == "cuda" and m <= 16:
            q = torch.nn.functional.pad(q, (0, 0, 0, 17 - m))  # CUDA's int8 GEMM needs more than 16 rows
        return (torch._int_mm(q, layer.qweight.t())[:m].float() * sx * layer.scale).to(x.dtype)  # (M, N)


W8A8_INT_MM = W8A8IntMMKernel()
