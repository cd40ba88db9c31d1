"""Weight-only kernels for CUDA: int4 through ATen's tinygemm (`_weight_int4pack_mm`) and int8
with a cast-and-scale epilogue.

tinygemm computes x @ W^T with W = (q - 8) * s + m per group in bfloat16, the same formula as the
CPU op (see cpu_int4.py), so m = (8 - z) * s. Its packer takes two codes per byte with the even
column in the high nibble (our portable layout keeps it in the low nibble), and needs N % 8 == 0,
K divisible by 16 * inner_k_tiles, and a group size in {32, 64, 128, 256}. Activations are rounded
to bfloat16 (the op's only input type); the reference kernel is the exact float32 path. From
`dense_rows` rows on (prefill), the weight is dequantized to bfloat16 for a cuBLAS GEMM.

int8 per-channel: y = (x @ q^T) * s, the codes cast to the activation dtype on the fly; the
asymmetric zero point adds the same rank-1 term as on CPU (cpu_int8.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase
from slimlm.quant.kernels.cpu_int4 import CpuInt4Kernel, tinygemm_params
from slimlm.quant.primitives import group_size_for

COMPUTE = torch.bfloat16
TINYGEMM_GROUPS = (32, 64, 128, 256)


def _inner_k_tiles(k: int) -> int | None:
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    return None


def _cuda_int4_available() -> bool:
    return torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")


class CudaInt4Kernel(CpuInt4Kernel):
    """The CPU tinygemm kernel's state, dense path and run, with CUDA's packing and op."""

    name = "cuda_int4"
    dense_rows = 128

    def supports(self, layer, device: torch.device) -> bool:
        if device.type != "cuda" or layer.slimlm_kind != "quantized_linear":
            return False
        s = layer.scheme
        if s.format != "int" or s.bits != 4:
            return False
        g = group_size_for(layer.in_features, s)
        return (g in TINYGEMM_GROUPS and layer.in_features % g == 0 and layer.out_features % 8 == 0
                and _inner_k_tiles(layer.in_features) is not None and _cuda_int4_available())

    def prepare(self, layer, dtype: torch.dtype) -> tuple[Tensor, int, Tensor, Tensor, Tensor]:
        q = layer.qweight  # (N, K/2) uint8: even column in the low nibble
        swapped = ((q & 0x0F) << 4) | (q >> 4)  # tinygemm's order: even column in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), _inner_k_tiles(layer.in_features))
        return (packed, *tinygemm_params(layer))  # the same scale/offset layout as the CPU op

    @staticmethod
    def matmul(xin: Tensor, packed: Tensor, group: int, scale_and_zero: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm(xin, packed, group, scale_and_zero)


class CudaInt8Kernel(KernelBase):
    name = "cuda_int8"

    def supports(self, layer, device: torch.device) -> bool:
        if device.type != "cuda" or layer.slimlm_kind != "quantized_linear":
            return False
        s = layer.scheme
        return s.format == "int" and s.bits == 8 and layer.scale.shape[1] == 1

    def prepare(self, layer, dtype: torch.dtype) -> tuple[torch.dtype, Tensor, Tensor | None]:
        compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        scale = layer.scale[:, 0].to(compute)  # (N,)
        shift = None
        if layer.zero is not None:
            shift = ((128 - layer.zero[:, 0].float()) * layer.scale[:, 0].float()).to(compute)  # (N,)
        return compute, scale, shift

    def dense_weight(self, layer, state) -> Tensor:
        compute, scale, shift = state
        w = layer.qweight.to(compute) * scale[:, None]  # (N, K)
        return w + shift[:, None] if shift is not None else w

    def run(self, x: Tensor, layer, state) -> Tensor:
        compute, scale, shift = state
        xin = x.to(compute)  # (M, K)
        y = F.linear(xin, layer.qweight.to(compute)) * scale  # codes as signed int8 q = u - 128
        if shift is not None:
            y = y + xin.sum(-1, keepdim=True) * shift
        return y.to(x.dtype)


CUDA_INT4 = CudaInt4Kernel()
CUDA_INT8 = CudaInt8Kernel()
