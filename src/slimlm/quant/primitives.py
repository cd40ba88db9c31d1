"""Pure quantization math: quantization parameters, quantize, dequantize, bit packing.

A group of weights w shares a scale s; each weight is stored as a b-bit code q. How a code maps to
a value is the scheme's format:

"int", uniform affine quantization (e.g. Jacob et al., arXiv 1712.05877; the weight-only form used by
GPTQ/AWQ/llama.cpp): with an integer zero point z, q = clamp(round(w / s) + z, 0, 2^b - 1), so that
w ≈ (q - z) · s. Symmetric schemes fix z = 2^(b-1) and use s = max|w| / (2^(b-1) - 1); asymmetric
schemes widen [min, max] to contain 0 and use s = (max - min) / (2^b - 1), z = round(-min / s).

Codebook formats: w ≈ codebook[q] · s with a fixed table of 2^b values, s = max|w| / max|codebook|
(a group's largest magnitude maps to the largest level) and q the nearest entry of w / s in the
linear domain; at a tie, the entry with the even code (for fp8 that is IEEE round-half-to-even).
Both are sign-magnitude: the top bit of q is the sign, the low b-1 bits a magnitude code that
ascends with the magnitude.
  - "log" (Miyashita et al., "Convolutional Neural Networks using Logarithmic Data
    Representation", arXiv 1603.01025): magnitude code m = 0 is zero, m ≥ 1 is 2^(m - M) with
    M = 2^(b-1) - 1, so log4 = {0, ±2^-6, ..., ±2^0}, log3 = {0, ±1/4, ±1/2, ±1} and log2 is
    ternary {0, ±1}. Deviation: the paper rounds log2|w| (nearest level in the log domain); we take
    the nearest level in the linear domain, which has the lower squared error (between levels a
    and 2a the log-domain cut √2·a lies below the midpoint 1.5·a, so values between the two go to
    the farther level).
  - "fp8" (Micikevicius et al., "FP8 Formats for Deep Learning", arXiv 2209.05433): q is the raw
    byte of a float8 e4m3 ("fn": no infinities, 0x7F/0xFF are NaN and never produced), so
    s = max|w| / 448 and w / s rounds exactly as torch's cast to float8_e4m3fn does, saturating.
    (float16 scales stop at 2^-14, so a group with max|w| < 0.027 uses only part of the e4m3
    range; as e4m3's relative precision is the same across its normal range, only values below
    2^-20 lose precision.)
  The zero points returned for these formats are 2^(b-1) (the symmetric int convention); that code
  is -0 in both, so it still decodes to 0, but quantize and dequantize ignore it.

Layout: a weight is (N, K) = (out_features, in_features); groups run along K. When the group size
does not divide K, the last group is padded with zeros (zeros never widen a range that already
contains zero) and the padded columns are dropped on dequantization.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
import torch.nn.functional as F

from slimlm.quant.scheme import QuantScheme


def group_size_for(k: int, scheme: QuantScheme) -> int:
    """Columns per group for a layer with k input features (per-channel, or a group wider than the
    layer: all of them)."""
    return min(scheme.group_size or k, k)


def padded_k(k: int, scheme: QuantScheme) -> int:
    g = group_size_for(k, scheme)
    return math.ceil(k / g) * g


def pad_columns(w: Tensor, k_padded: int) -> Tensor:
    """(N, K) -> (N, k_padded) with zero columns on the right."""
    return F.pad(w, (0, k_padded - w.shape[1])) if k_padded != w.shape[1] else w


def codebook(scheme: QuantScheme) -> Tensor:
    """Value of every code of a codebook format in units of the scale, (2^b,) float32 (NaN for
    codes that are not a number: 0x7F and 0xFF of e4m3). See the module docstring."""
    if scheme.format == "fp8":
        return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    if scheme.format == "log":
        half = 2 ** (scheme.bits - 1)
        m = torch.arange(half)  # magnitude codes; 0 is zero, half - 1 is 2^0
        magnitude = torch.where(m > 0, torch.exp2((m - (half - 1)).float()), torch.zeros(half))
        return torch.cat([magnitude, -magnitude])  # sign bit clear, then set
    raise ValueError(f"format {scheme.format!r} has no codebook")


def _levels(scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor]:
    """The codebook's distinct values ascending (L,), the lowest code of each (L,) int64 (so 0 is
    +0) and the midpoints between neighbours (L - 1,). Cached: GPTQ asks once per column."""
    return _levels_of(scheme.format, scheme.bits)


@functools.cache
def _levels_of(format: str, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    values = codebook(QuantScheme(bits=bits, format=format, symmetric=True))
    codes = torch.arange(values.numel())[~values.isnan()]
    values = values[codes]
    order = torch.argsort(values, stable=True)  # stable: of +0 and -0, code 0 comes first
    values, codes = values[order], codes[order]
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    values, codes = values[first], codes[first]
    return values, codes, (values[1:] + values[:-1]) / 2  # midpoints are exact in float32


def max_level(scheme: QuantScheme) -> float:
    """Largest magnitude a symmetric scheme represents, in units of the scale."""
    if scheme.format == "int":
        return float(2 ** (scheme.bits - 1) - 1)
    return float(_levels(scheme)[0].abs().max())


def encode(x: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Codes (uint8, x's shape) of values x already divided by their scale; zero broadcasts
    against x (int format only)."""
    if scheme.format == "int":
        return (torch.round(x) + zero).clamp(0, 2**scheme.bits - 1).to(torch.uint8)
    _, codes, mid = (t.to(x.device) for t in _levels(scheme))
    below = torch.bucketize(x, mid)  # mid[i-1] < x <= mid[i]: the lower level at a tie
    above = torch.bucketize(x, mid, right=True)  # differs from `below` only at a tie
    index = torch.where((above != below) & (codes[above] % 2 == 0), above, below)
    return codes[index].to(torch.uint8)


def decode(codes: Tensor, zero: Tensor, scheme: QuantScheme | None) -> Tensor:
    """Values (float32, codes' shape) in units of the scale; zero broadcasts (int format only).
    scheme None: the codes are integers (all an int scheme's values depend on)."""
    if scheme is None or scheme.format == "int":
        return (codes.to(torch.int16) - zero.to(torch.int16)).float()  # exact
    if scheme.format == "fp8":
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()  # = codebook[codes], without a gather
    table = codebook(scheme).to(codes.device)
    return table.index_select(0, codes.reshape(-1).int()).view(codes.shape)


def compute_qparams(w: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Scales (N, G) in the scheme's scale dtype and zero points (N, G) int32 for weight w (N, K)."""
    n, k = w.shape
    g = group_size_for(k, scheme)
    wg = pad_columns(w.float(), padded_k(k, scheme)).view(n, -1, g)  # (N, G, g)
    if scheme.symmetric:
        scale = wg.abs().amax(-1) / max_level(scheme)  # (N, G)
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / (2**scheme.bits - 1)  # (N, G)
    # An all-zero group gets scale 1 (any scale reproduces it); the scale is rounded to its storage
    # precision before the zero point and codes are computed, so stored values are self-consistent.
    tiny = torch.finfo(scheme.torch_scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=tiny).to(scheme.torch_scale_dtype)
    if scheme.symmetric:
        zero = torch.full_like(scale, 2 ** (scheme.bits - 1), dtype=torch.int32)
    else:
        zero = torch.round(-lo / scale.float()).clamp(0, 2**scheme.bits - 1).to(torch.int32)
    return scale, zero


def search_qparams(
    w: Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.2, norm: float = 2.4, rows: int = 256
) -> tuple[Tensor, Tensor]:
    """Like `compute_qparams`, but each group's range is shrunk by the factor in
    {1, 1 - max_shrink/grid, ..., 1 - max_shrink} that minimises Σ|w - ŵ|^norm over the group
    (the clipping search of GPTQ's reference quantizer, `mse=True`, norm 2.4). Trading a few clipped
    outliers for a finer step usually lowers the layer error at 3-4 bits. Works on `rows` rows at a
    time, so its temporaries stay small next to the weight."""
    if w.shape[0] > rows:
        parts = [search_qparams(w[i : i + rows], scheme, grid, max_shrink, norm, rows) for i in range(0, w.shape[0], rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n, k = w.shape
    g = group_size_for(k, scheme)
    kp = padded_k(k, scheme)
    wp = pad_columns(w.float(), kp)
    best_scale, best_zero = compute_qparams(w, scheme)
    best_err = torch.full(best_scale.shape, float("inf"))
    for i in range(grid + 1):
        factor = 1.0 - max_shrink * i / grid
        scale, zero = compute_qparams(w * factor, scheme)
        codes = quantize(wp, scale, zero, scheme)  # the unshrunk weights, clipped by the shrunk range
        err = (dequantize(codes, scale, zero, kp, scheme=scheme) - wp).abs().pow(norm).view(n, -1, g).sum(-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Codes (N, K_padded) uint8 in [0, 2^b - 1] for weight w (N, K) with qparams (N, G)."""
    n, k = w.shape
    g = group_size_for(k, scheme)
    wg = pad_columns(w.float(), padded_k(k, scheme)).view(n, -1, g)  # (N, G, g)
    return encode(wg / scale.float()[..., None], zero[..., None], scheme).view(n, -1)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, k: int, dtype: torch.dtype = torch.float32,
    scheme: QuantScheme | None = None,
) -> Tensor:
    """Weight (N, k) from codes (N, K_padded) and qparams (N, G). scheme: the codes' format; None
    reads them as integers (enough for int schemes, whose values depend on the zero points only)."""
    n, kp = codes.shape
    g = kp // scale.shape[1]
    values = decode(codes.view(n, -1, g), zero[..., None], scheme)  # (N, G, g)
    w = values * scale.float()[..., None]
    return w.view(n, kp)[:, :k].to(dtype)


def fake_quantize(w: Tensor, scheme: QuantScheme) -> Tensor:
    """Round-trip w through the scheme (quantize then dequantize), same shape and dtype."""
    scale, zero = compute_qparams(w, scheme)
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, w.shape[1], w.dtype, scheme)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack codes (N, K) uint8 of `bits` bits each into bytes.

    8 bits: int8 holding q - 128 (what int8 matmul kernels read directly).
    Fewer bits: every 8 consecutive codes become `bits` bytes, little-endian, code i at bit
    offset bits * i; so for 4 bits the even column is the low nibble. K is padded to a multiple of 8.
    Returns (N, ceil(K / 8) * bits) uint8.
    """
    if bits == 8:
        return (codes.to(torch.int16) - 128).to(torch.int8)
    n, k = codes.shape
    c = F.pad(codes, (0, (-k) % 8)).view(n, -1, 8).to(torch.int64)  # (N, K/8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (N, K/8, 1): 8 codes in 8*bits bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).view(n, -1)


def unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack`: codes (N, k) uint8."""
    if bits == 8:
        return (packed.to(torch.int16) + 128).to(torch.uint8)[:, :k]
    n = packed.shape[0]
    if 8 % bits == 0:  # byte-aligned (2, 4 bits): code i of each byte sits at bit offset bits * i
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed[..., None] >> shifts) & (2**bits - 1)  # (N, bytes, per_byte)
        return codes.view(n, -1)[:, :k]
    b = packed.view(n, -1, bits).to(torch.int64)  # (N, K/8, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (N, K/8, 1)
    codes = (word >> (torch.arange(8, dtype=torch.int64, device=packed.device) * bits)) & (2**bits - 1)  # (N, K/8, 8)
    return codes.to(torch.uint8).view(n, -1)[:, :k]
