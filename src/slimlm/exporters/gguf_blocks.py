"""slimlm's integer codes as GGML blocks, without re-quantizing (pure functions over tensors).

GGML's simple block types hold 32 consecutive weights of a row with one float16 scale (and a min):

  Q8_0  34 bytes: d (f16), 32 × int8 q                 w = q · d
  Q4_0  18 bytes: d (f16), 16 bytes of nibbles         w = (q - 8) · d,  q ∈ [0, 15]
  Q4_1  20 bytes: d (f16), m (f16), 16 bytes           w = q · d + m,    q ∈ [0, 15]

(nibble j of the 16 bytes: low half = weight j, high half = weight j + 16; see llama.cpp's
`ggml-quants.c`). slimlm stores w = (code - zero) · scale per group of g columns, codes in
[0, 2^b - 1], zero fixed at 2^(b-1) for symmetric schemes. So a symmetric int8 layer is Q8_0 with
q = code - 128, a symmetric int4 layer is Q4_0 with q = code, an asymmetric int4 layer is Q4_1 with
m = -zero · scale, whenever each 32-block lies inside one group (g a multiple of 32, per-channel
included) and the row length is a multiple of 32. The codes are copied; only a scale (or the min)
that is not already a float16 is rounded to one, and `block_values` gives the weights the blocks
mean so that rounding can be measured.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 32
# type name -> (bits, symmetric) of the slimlm int scheme it holds exactly
LOSSLESS = {"q8_0": (8, True), "q4_0": (4, True), "q4_1": (4, False)}
BYTES_PER_BLOCK = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def block_params(scale: Tensor, zero: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-block scale and zero point (N, K/32) from per-group ones (N, G) of a layer with k inputs."""
    n, groups = scale.shape
    g = -(-k // groups)  # group width (the last group may be padded past k)
    per_group = g // BLOCK
    blocks = k // BLOCK
    return (scale.float().repeat_interleave(per_group, 1)[:, :blocks],  # (N, B)
            zero.float().repeat_interleave(per_group, 1)[:, :blocks])  # (N, B)


def pack_blocks(kind: str, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Rows of GGML blocks (N, K/32 · bytes per block) uint8 for codes (N, K) uint8 in [0, 2^b - 1]
    and per-block scale and zero (N, K/32) float."""
    n, k = codes.shape
    b = k // BLOCK
    q = codes.view(n, b, BLOCK)  # (N, B, 32)
    d = scale.to(torch.float16).view(n, b, 1).view(torch.uint8)  # (N, B, 2): f16 bytes, little-endian
    if kind == "q8_0":
        body = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)  # (N, B, 32)
        parts = [d, body]
    elif kind in ("q4_0", "q4_1"):
        body = q[..., :16] | (q[..., 16:] << 4)  # (N, B, 16)
        parts = [d, body]
        if kind == "q4_1":
            m = (-zero * scale).to(torch.float16).view(n, b, 1).view(torch.uint8)  # (N, B, 2)
            parts = [d, m, body]
    else:
        raise ValueError(f"no lossless packing for {kind}")
    return torch.cat(parts, -1).reshape(n, b * BYTES_PER_BLOCK[kind])


def block_values(kind: str, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The weights (N, K) float32 that `pack_blocks` writes mean (scales and mins rounded to float16)."""
    n, k = codes.shape
    b = k // BLOCK
    q = codes.view(n, b, BLOCK).float()
    d = scale.to(torch.float16).float()[..., None]  # (N, B, 1)
    if kind == "q4_1":
        m = (-zero * scale).to(torch.float16).float()[..., None]
        return (q * d + m).view(n, k)
    mid = 128.0 if kind == "q8_0" else 8.0
    return ((q - mid) * d).view(n, k)


def permute_rows(w: Tensor, heads: int) -> Tensor:
    """Rows of a q or k projection (heads · D, ...) from Hugging Face's rotary layout (halves: the
    pair of dimension i is i + D/2) to llama.cpp's Llama layout (interleaved: pairs 2i, 2i+1); works
    on codes, scales and zero points alike, as they share the rows (convert_hf_to_gguf's `permute`)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
