"""GPTQ's layer solver (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323, Algorithm 1).

Quantize the columns of W (N, K) one at a time; after each, spread its rounding error over the
columns not yet quantized, weighted by the inverse Hessian H⁻¹ of the layer-wise loss ‖WX − ŴX‖²
(H = 2XXᵀ), so later columns compensate for earlier errors. As in the paper:
  - dampening: H += λ·mean(diag H)·I (λ = `damp`); dead inputs (H_ii = 0) get H_ii = 1 and W_:i = 0;
  - H⁻¹ enters through its upper Cholesky factor (numerically stable form of the OBS updates);
  - lazy batch updates: errors are applied inside a block of `block_size` columns at once, and to
    the rest of the matrix once per block;
  - act-order (optional): columns in order of decreasing H_ii.
Grouped scales: without act-order, a group's scale and zero point are computed from its columns as
updated so far, when the solver reaches the group (the block size is rounded to a multiple of the
group size so a group never straddles a block). With act-order the groups' parameters are fixed up
front from the original weights ("static groups"), so the saved codes are in the original column
order with contiguous groups and need no reordering or group index at run time.
Every format of `QuantScheme` works: a column is quantized to the nearest level of its group's
scale (uniform integers, or the log/fp8 codebook), by the same `primitives.encode` as RTN.
Oracle: with H = I no error is propagated and the result equals round-to-nearest.
Pruned weights (exact zeros of w, e.g. from Wanda or SparseGPT) stay zero: they are quantized to the
code of 0 and their (zero) error is not spread back into them, so a sparsity pattern survives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.core.hessian import inverse_hessian_factor_
from slimlm.quant import primitives as P
from slimlm.quant.scheme import QuantScheme


def _quantize_column(w: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Codes (N,) uint8 and dequantized values (N,) of one column w (N,) with per-row scale/zero (N,)."""
    codes = P.encode(w / scale, zero, scheme)
    return codes, P.decode(codes, zero, scheme) * scale


def gptq_quantize(
    w: Tensor, h: Tensor, scheme: QuantScheme, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
    clip_search: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize w (N, K) given the Hessian h (K, K). Returns codes (N, K_padded) uint8, scale (N, G)
    in the scheme's scale dtype and zero (N, G) int32, in the layout of `primitives.quantize`.
    clip_search: choose each group's range by `primitives.search_qparams` instead of min/max."""
    qparams = P.search_qparams if clip_search else P.compute_qparams
    n, k = w.shape
    w = w.to(torch.float32).clone()
    pruned = w == 0  # (N, K): kept at zero
    any_pruned = bool(pruned.any())
    h = h.to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = P.group_size_for(k, scheme)
    n_groups = P.padded_k(k, scheme) // g
    static = act_order or g == k  # per-channel or act-order: parameters fixed before solving
    if static:
        scale, zero = qparams(w, scheme)  # (N, G)
    else:
        scale = torch.empty(n, n_groups, dtype=scheme.torch_scale_dtype)
        zero = torch.empty(n, n_groups, dtype=torch.int32)
        block_size = max(g, block_size // g * g)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    if act_order:
        w, h, pruned = w[:, perm], h.index_select(0, perm).index_select(1, perm), pruned[:, perm]
    hinv = inverse_hessian_factor_(h, damp)  # (K, K) upper triangular
    del h
    codes = torch.empty(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()  # (N, B), updated in place as columns are quantized
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            group = int(perm[col]) // g
            if not static and col % g == 0:
                s, z = qparams(w1[:, i : i + g], scheme)  # (N, 1): the group as updated so far
                scale[:, group], zero[:, group] = s[:, 0], z[:, 0]
            s, z = scale[:, group].float(), zero[:, group].float()
            c, q = _quantize_column(w1[:, i], s, z, scheme)
            if any_pruned:
                keep_zero = pruned[:, col]
                zero_code, _ = _quantize_column(torch.zeros_like(q), s, z, scheme)
                c, q = torch.where(keep_zero, zero_code, c), torch.where(keep_zero, torch.zeros_like(q), q)
            codes[:, col] = c
            e = (w1[:, i] - q) / hinv1[i, i]  # (N,)
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # lazy batch update of the remaining columns
    codes = codes[:, torch.argsort(perm)]  # back to the original column order
    kp = P.padded_k(k, scheme)
    if kp > k:  # padded columns hold the code of 0 in the last group
        zero_codes = P.encode(torch.zeros(n, 1), zero[:, -1:], scheme)  # (N, 1)
        codes = torch.cat([codes, zero_codes.expand(n, kp - k)], 1)
    return codes, scale, zero
