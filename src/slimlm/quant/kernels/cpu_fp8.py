"""fp8 (e4m3) weight-only matmul on CPU: widen the stored bytes to bfloat16 with integer shifts on
every call, scale per group, then a dense bfloat16 GEMM. Nothing is cached beyond the scales, so
the layer keeps its 1 byte per weight.

The bytes need no lookup: an e4m3 byte s eeee mmm moved to bits 15 and 10..4 of an int16 is the
bfloat16 whose value is the e4m3 value times 2^-120 (the exponent biases are 7 and 127), subnormals
included (they land on bfloat16 subnormals, which the 2^120 multiply makes normal again; with
flush-to-zero enabled they read as 0, an error below 2^-6 · scale = max|w| / 28672). `primitives.pack`
stores each 8-bit code as int8 q - 128, which is the e4m3 byte with its sign bit flipped, so the
scale is negated instead of the bytes. Exact conversion: every e4m3 value is a bfloat16.

Precision: weights times scales and activations are rounded to bfloat16, as in the other CPU
kernels; the reference kernel is the exact float32 path. Measured at 2048x2048, M=1, on 1-2 CPU
threads of a shared machine: 1.4-1.8 ms per-channel (1.6-2.0 ms with groups of 128), against 8-14 ms
for the reference kernel, 0.3 ms for an fp32 dense matmul and 0.1 ms for cpu_int8; widening with
`.view(float8_e4m3fn).to(bfloat16)` instead of the shifts takes 14-23 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.quant.kernels.base import KernelBase

COMPUTE = torch.bfloat16
BIAS_SHIFT = 2.0**120  # 2^(127 - 7): bfloat16 and e4m3 exponent biases
KEEP = -30736  # 0x87F0 as int16: the sign bit and the 7 bits e4m3 shares with bfloat16 after the shift


class CpuFp8Kernel(KernelBase):
    name = "cpu_fp8"

    def supports(self, layer, device: torch.device) -> bool:
        # |scale| * 2^120 must stay finite in bfloat16 (< 2^128): scales below 2^7, i.e. max|w| < 57344
        return (device.type == "cpu" and layer.slimlm_kind == "quantized_linear" and layer.scheme.format == "fp8"
                and bool(layer.scale.float().abs().max() < 2.0**7))

    def prepare(self, layer, dtype: torch.dtype) -> Tensor:
        return (layer.scale.float() * -BIAS_SHIFT).to(COMPUTE)[..., None]  # (N, G, 1), sign flip folded in

    def dense_weight(self, layer, state: Tensor) -> Tensor:
        """The weight (N, K) in bfloat16."""
        n, k = layer.out_features, layer.in_features
        shifted = ((layer.qweight.to(torch.int16) << 8) >> 4) & KEEP  # (N, Kp): s...s eeee mmm 0000
        w = shifted.view(COMPUTE).view(n, state.shape[1], -1) * state  # (N, G, g)
        return w.view(n, -1)[:, :k]

    def run(self, x: Tensor, layer, state: Tensor) -> Tensor:
        return F.linear(x.to(COMPUTE), self.dense_weight(layer, state)).to(x.dtype)


CPU_FP8 = CpuFp8Kernel()
