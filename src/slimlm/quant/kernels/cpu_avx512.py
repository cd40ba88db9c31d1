"""AVX-512 decode kernels for int4/int8 weights, C++ compiled at first use (`csrc/avx512_decode.cpp`,
through `torch.utils.cpp_extension`), for the few rows of a decode step.

  cpu_int4_a8      int4 (groups of 32-256) with activations quantized to int8 per 32 columns (`vpdpbusd`,
                   llama.cpp's Q4_0 x Q8_0 arithmetic), read straight from the layer's own buffers: no
                   repacked copy, so an int4 model holds its weights once. The default for decode: as
                   fast as the bf16 kernel at g32 and faster at g128, while the activation rounding
                   adds 1-2% to the KL of int4 itself (demo model, README "Kernels");
  cpu_int4_avx512  int4 g32/g128 with bfloat16 activations (`_mm512_dpbf16_ps`) on a repacked copy of
                   the codes (held next to them): on request (`layer.set_kernel_("cpu_int4_avx512")`);
  cpu_int8_a16     int8 per-channel with activations quantized to int16 per 256 columns (`vpdpwssd`: an
                   error of 2^-16 of the block's largest value, below bfloat16's own rounding), read
                   straight from the layer's codes: the default for int8 (and int4 models' int8 head),
                   weights held once, as fast as the repacked bf16 kernel (29.2 vs 28.2 GB/s in place,
                   1.1B-shaped layers, 2 threads, alternating rounds);
  cpu_int8_avx512  int8 per-channel with bfloat16 activations on a repacked copy: on request;
  cpu_int8_a8      int8 weights x int8 activations, on request (it triples int8's small KL).
From `DENSE_ROWS` rows on (prefill), weights are dequantized to bfloat16 for a dense GEMM.

The extension is built once per CPU feature set (the name carries a hash of the source and the
flags, since it is compiled with -march=native) and cached by torch. Without a C++ compiler, on a
CPU without AVX-512 VNNI/BF16, or with SLIMLM_NO_CPP=1, these kernels report that they do not
support the layer and the ATen kernels run instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from slimlm.core.cpp_ext import load_cpp
from slimlm.core.memory import hugepage_empty
from slimlm.quant.kernels.base import KernelBase
from slimlm.quant.kernels.cpu_int4 import COMPUTE
from slimlm.quant.primitives import group_size_for

SOURCE = Path(__file__).parent / "csrc" / "avx512_decode.cpp"
NEEDED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
FUNCTIONS = ("q8a8_mm", "q4bf16_mm_many", "q8bf16_mm", "q4_dequant_bf16", "q8_dequant_bf16", "q4p_a8_mm_many",
             "q8p_a16_mm_many")
DENSE_ROWS = 128  # the kernel beats dequantize + bf16 GEMM up to ~64-128 rows (benchmarks/kernels.py)
DENSE_CHUNK = 1024  # weight rows dequantized at a time for prefill's GEMM


def extension():
    """The compiled module, or None where it cannot be built or run here."""
    return load_cpp("slimlm_avx512_decode", SOURCE, FUNCTIONS, NEEDED_FLAGS)


def repack_int4(layer) -> tuple[Tensor, Tensor, Tensor]:
    """qw uint8 (N/16, K/8·64), sc fp16 (N/16, G, 16), zp uint8 (N/16, G, 16): 16-row tiles, each 8-column
    chunk 64 bytes with byte 4j+i = q[16t+j, 8c+i] | q[16t+j, 8c+4+i] << 4 (see the .cpp header)."""
    n, k = layer.out_features, layer.in_features
    q = layer.codes().view(n // 16, 16, k // 8, 2, 4)  # (tile, row, chunk, half, i)
    qw = hugepage_empty((n // 16, k // 8, 16, 4), torch.uint8)
    qw.copy_((q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3))
    qw = qw.view(n // 16, -1)
    g = layer.scale.shape[1]
    sc = layer.scale.to(torch.float16).view(n // 16, 16, g).transpose(1, 2).contiguous()
    zp = layer.zero_points().to(torch.uint8).view(n // 16, 16, g).transpose(1, 2).contiguous()
    return qw, sc, zp


def repack_int8(layer) -> tuple[Tensor, Tensor, Tensor]:
    """qw uint8 (N/16, K·16) of unsigned codes in 16x4 chunks, per-row scale and zero point fp32 (N,)."""
    n, k = layer.out_features, layer.in_features
    codes = layer.qweight.view(torch.uint8) ^ 0x80  # int8 q - 128 -> unsigned q
    qw = hugepage_empty((n // 16, k // 4, 16, 4), torch.uint8)
    qw.copy_(codes.view(n // 16, 16, k // 4, 4).permute(0, 2, 1, 3))
    qw = qw.view(n // 16, -1)
    return qw, layer.scale.float().reshape(n).contiguous(), layer.zero_points().float().reshape(n).contiguous()


class _Avx512Kernel(KernelBase):
    bits = 4
    activations = "bf16"
    dense_rows = DENSE_ROWS

    def supports(self, layer, device: torch.device) -> bool:
        if device.type != "cpu" or layer.slimlm_kind != "quantized_linear":
            return False
        s = layer.scheme
        if s.format != "int" or s.bits != self.bits:
            return False
        n, k = layer.out_features, layer.in_features
        if n % 16 or k % 32:
            return False
        if self.bits == 4 and (group_size_for(k, s) not in (32, 128) or k % group_size_for(k, s)
                               or s.scale_dtype != "float16"):
            return False
        if self.bits == 8 and layer.scale.shape[1] != 1:
            return False
        return extension() is not None

    def prepare(self, layer, dtype: torch.dtype):
        if self.bits == 8:
            return repack_int8(layer), None
        group = group_size_for(layer.in_features, layer.scheme)
        return (*repack_int4(layer), group), group

    def dense_weight(self, layer, state) -> Tensor:
        """The weight (N, K) in bfloat16 for prefill's dense GEMM (int4: in C++ from the portable codes)."""
        return self.dense_weight_rows(layer, state, 0, layer.out_features)

    def dense_weight_rows(self, layer, state, a: int, b: int) -> Tensor:
        """Rows a..b-1 of `dense_weight`."""
        packed, dense = state
        if self.bits == 8:
            _, scale, zero = packed  # fp32 (N,) each
            return extension().q8_dequant_bf16(layer.qweight[a:b], scale[a:b], zero[a:b])
        zero = layer.zero[a:b] if layer.zero is not None else torch.empty(0, dtype=torch.uint8)
        return extension().q4_dequant_bf16(layer.qweight[a:b], layer.scale[a:b], zero, dense)

    def dense_matmul(self, x: Tensor, layer, state) -> Tensor:
        """Prefill: x (M, K) @ W^T with W dequantized to bfloat16 `DENSE_CHUNK` rows at a time, so the
        temporaries are a few MB rather than the whole bf16 weight (23 MB for a 1.1B model's MLP)."""
        xin, n = x.to(COMPUTE), layer.out_features
        ys = [F.linear(xin, self.dense_weight_rows(layer, state, a, min(n, a + DENSE_CHUNK))) for a in range(0, n, DENSE_CHUNK)]
        return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)).to(x.dtype)

    def run(self, x: Tensor, layer, state) -> Tensor:
        packed = state[0]
        if x.shape[0] >= self.dense_rows:  # prefill: dequantize to bfloat16 once per call, dense GEMM
            return self.dense_matmul(x, layer, state)
        ext = extension()
        if self.activations == "bf16" and self.bits == 8:
            y = ext.q8bf16_mm(x.to(COMPUTE).contiguous(), *packed, x.dtype == COMPUTE)
        elif self.activations == "bf16":
            qw, sc, zp, group = packed
            y = ext.q4bf16_mm_many(x.to(COMPUTE).contiguous(), [qw], [sc], [zp], group, x.dtype == COMPUTE)[0]
        else:
            y = ext.q8a8_mm(x.float().contiguous(), *packed)
        return y.to(x.dtype)


class CpuInt4Avx512Kernel(_Avx512Kernel):
    name = "cpu_int4_avx512"

    def run_many(self, x: Tensor, layers: list, states: list) -> list[Tensor]:
        """x (M, K) against several layers at once (q/k/v, gate/up) in one parallel region; one call per
        layer when they cannot share one (different group sizes, or enough rows for the dense path)."""
        groups = {state[0][3] for state in states}
        if len(groups) != 1 or x.shape[0] >= self.dense_rows:
            return super().run_many(x, layers, states)
        packed = [state[0] for state in states]
        ys = extension().q4bf16_mm_many(x.to(COMPUTE).contiguous(), [p[0] for p in packed], [p[1] for p in packed],
                                        [p[2] for p in packed], groups.pop(), x.dtype == COMPUTE)
        return [y.to(x.dtype) for y in ys]


class CpuInt4A8Kernel(_Avx512Kernel):
    """int4 weights x int8 activations read straight from the layer's portable buffers (`q4p_a8_mm_many`):
    no repacked copy, so an int4 model holds its weights once."""

    name = "cpu_int4_a8"
    activations = "int8"

    def supports(self, layer, device: torch.device) -> bool:
        if device.type != "cpu" or layer.slimlm_kind != "quantized_linear":
            return False
        s, k = layer.scheme, layer.in_features
        group = group_size_for(k, s)
        return (s.format == "int" and s.bits == 4 and s.scale_dtype == "float16" and k % 32 == 0
                and group in (32, 64, 128, 256) and k % group == 0 and extension() is not None)

    def prepare(self, layer, dtype: torch.dtype):
        return None, group_size_for(layer.in_features, layer.scheme)  # nothing repacked; (unused, group)

    def run(self, x: Tensor, layer, state) -> Tensor:
        return self.run_many(x, [layer], [state])[0]

    def run_many(self, x: Tensor, layers: list, states: list) -> list[Tensor]:
        """x (M, K) against several layers reading it (q/k/v, gate/up) in one parallel region."""
        if x.shape[0] >= self.dense_rows:  # prefill: dequantize to bfloat16 once per call, dense GEMM
            return [self.dense_matmul(x, layer, state) for layer, state in zip(layers, states)]
        fn = self.bind(layers, states)
        if fn is None:  # different group sizes: one call each
            return [self.bind([layer], [state])(x)[0] for layer, state in zip(layers, states)]
        return fn(x)

    def bind(self, layers: list, states: list):
        """fn(x (M, K)) -> [(M, N_j)] for these layers with the arguments resolved once, for the engine's
        decode steps (a Python call per layer per step costs more than the C++ call; fewer than
        `dense_rows` rows). None where the layers cannot share one call (different group sizes)."""
        groups = {state[1] for state in states}
        if len(groups) != 1:
            return None
        group, ext = groups.pop(), extension()
        empty = torch.empty(0, dtype=torch.uint8)
        qweights = [layer.qweight for layer in layers]
        scales = [layer.scale.contiguous() for layer in layers]
        zeros = [layer.zero if layer.zero is not None else empty for layer in layers]

        def run(x: Tensor) -> list[Tensor]:
            ys = ext.q4p_a8_mm_many(x if x.dtype in (torch.float32, COMPUTE) else x.float(), qweights, scales, zeros,
                                    group, x.dtype == COMPUTE)
            return ys if x.dtype in (torch.float32, COMPUTE) else [y.to(x.dtype) for y in ys]

        return run


class CpuInt8Avx512Kernel(_Avx512Kernel):
    name = "cpu_int8_avx512"
    bits = 8


class CpuInt8A16Kernel(_Avx512Kernel):
    """int8 per-channel weights x int16 activations read straight from the layer's portable codes
    (`q8p_a16_mm_many`): no repacked copy, so an int8 model (and an int4 model's int8 head) holds its
    weights once. Activations are quantized to int16 per 256 columns, an error far below bfloat16's."""

    name = "cpu_int8_a16"
    bits = 8
    activations = "int16"

    def supports(self, layer, device: torch.device) -> bool:
        if device.type != "cpu" or layer.slimlm_kind != "quantized_linear":
            return False
        s = layer.scheme
        return (s.format == "int" and s.bits == 8 and layer.scale.shape[1] == 1 and layer.in_features % 32 == 0
                and layer.qweight.dtype == torch.int8 and extension() is not None)

    def prepare(self, layer, dtype: torch.dtype):
        """(scale (N,), shift (N,) or empty, zero point (N,)) fp32: y = s·(x @ q^T) + t·sum(x), t = s·(128 - z)."""
        n = layer.out_features
        scale = layer.scale.float().reshape(n).contiguous()
        zero = layer.zero_points().float().reshape(n).contiguous()  # of the unsigned codes: 128 when symmetric
        shift = (scale * (128 - zero)).contiguous() if layer.zero is not None else torch.empty(0)
        return scale, shift, zero

    def dense_weight_rows(self, layer, state, a: int, b: int) -> Tensor:
        scale, _, zero = state
        return extension().q8_dequant_bf16(layer.qweight[a:b], scale[a:b], zero[a:b])

    def run(self, x: Tensor, layer, state) -> Tensor:
        return self.run_many(x, [layer], [state])[0]

    def run_many(self, x: Tensor, layers: list, states: list) -> list[Tensor]:
        if x.shape[0] >= self.dense_rows:  # prefill: dequantize to bfloat16 once per call, dense GEMM
            return [self.dense_matmul(x, layer, state) for layer, state in zip(layers, states)]
        return self.bind(layers, states)(x)

    def bind(self, layers: list, states: list):
        """fn(x (M, K)) -> [(M, N_j)] for these layers, arguments resolved once (see `CpuInt4A8Kernel.bind`)."""
        ext = extension()
        qweights = [layer.qweight for layer in layers]
        scales, shifts = [state[0] for state in states], [state[1] for state in states]

        def run(x: Tensor) -> list[Tensor]:
            native = x.dtype in (torch.float32, COMPUTE)
            ys = ext.q8p_a16_mm_many(x if native else x.float(), qweights, scales, shifts, x.dtype == COMPUTE)
            return ys if native else [y.to(x.dtype) for y in ys]

        return run


class CpuInt8A8Kernel(_Avx512Kernel):
    name = "cpu_int8_a8"
    bits = 8
    activations = "int8"


CPU_INT4_AVX512 = CpuInt4Avx512Kernel()
CPU_INT4_A8 = CpuInt4A8Kernel()
CPU_INT8_AVX512 = CpuInt8Avx512Kernel()
CPU_INT8_A16 = CpuInt8A16Kernel()
CPU_INT8_A8 = CpuInt8A8Kernel()
