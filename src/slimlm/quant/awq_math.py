"""AWQ's math (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", arXiv 2306.00978), as pure functions over tensors.

1. Scale search (§3.2): layers sharing an input x (T, K) are rescaled by s (K,) before
   round-to-nearest, W -> Q(W·s)/s, which protects the columns that meet large activations. s comes
   from a grid over the exponent α in [0, 1): s = mean|x|^α (paper), or with `duo` scaling (the
   authors' released code) s = mean|x|^α / mean|Ŵ|^(1−α), with |Ŵ| the weight magnitudes normalised
   within each quantization group; s is normalised by sqrt(max·min). The α with the lowest output
   error Σ_layers ‖x Wᵀ − (x/s) Q(W·s)ᵀ‖² wins; s = 1 (plain round-to-nearest) is always a
   candidate, so the search never does worse than RTN on the calibration sample.
   Deviation: the error is measured on the group's own layer outputs, not on the output of the
   enclosing module (attention or MLP) as in the released code; no architecture knowledge needed.
2. Clipping search (§3.3 of the released code, "auto_clip"): each group's range is shrunk by a
   factor in {1, 1 − max_shrink/grid, ...} chosen per (row, group) to minimise the error of that
   group's contribution to the layer output, ‖x_g (w_g − ŵ_g)ᵀ‖², on a sample of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.quant import primitives as P
from slimlm.quant.scheme import QuantScheme


def weight_magnitude(weights: list[Tensor], scheme: QuantScheme) -> Tensor:
    """Mean over all rows of |w| normalised by its group's max|w|, per input channel (K,)."""
    rows = []
    for w in weights:  # each (N, K)
        n, k = w.shape
        g = P.group_size_for(k, scheme)
        wg = P.pad_columns(w.abs().float(), P.padded_k(k, scheme)).view(n, -1, g)  # (N, G, g)
        rows.append((wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view(n, -1)[:, :k])
    return torch.cat(rows).mean(0)


def candidate_scales(x_mean: Tensor, w_mean: Tensor, alpha: float, duo: bool) -> Tensor:
    """Per-channel scales s (K,) for exponent α, normalised so that max·min = 1."""
    s = x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4) if duo else x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(x: Tensor, weights: list[Tensor], s: Tensor | None, scheme: QuantScheme) -> float:
    """Σ over layers of the mean squared output error of round-to-nearest after scaling by s (None: s = 1)."""
    total = 0.0
    for w in weights:  # (N, K)
        reference = x @ w.t()  # (T, N)
        if s is None:
            out = x @ P.fake_quantize(w, scheme).t()
        else:
            out = (x / s) @ P.fake_quantize(w * s, scheme).t()
        total += float((reference - out).pow(2).mean())
    return total


def search_scales(
    x: Tensor, weights: list[Tensor], x_mean: Tensor, scheme: QuantScheme, grid: int = 20, duo: bool = True
) -> tuple[Tensor, float, float, float | None]:
    """Best scales (K,) for layers `weights` (each (N, K)) reading x (T, K) with mean|x| x_mean (K,).

    Returns (s, its error, the error of plain round-to-nearest, the winning α or None for s = 1)."""
    x, weights = x.float(), [w.float() for w in weights]
    rtn_error = scaled_error(x, weights, None, scheme)
    best = (torch.ones_like(x_mean), rtn_error, None)
    w_mean = weight_magnitude(weights, scheme) if duo else x_mean
    for i in range(grid):
        alpha = i / grid
        s = candidate_scales(x_mean.float(), w_mean, alpha, duo)
        error = scaled_error(x, weights, s, scheme)
        if error < best[1]:
            best = (s, error, alpha)
    return best[0], best[1], rtn_error, best[2]


def search_clip(
    w: Tensor, x: Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5, chunk_bytes: int = 2**26
) -> tuple[Tensor, Tensor]:
    """Scales and zero points (N, G) of w (N, K) whose range is shrunk per (row, group) to minimise
    the mean over tokens of (x_g · (w_g − ŵ_g))², x (T, K)."""
    n, k = w.shape
    g = P.group_size_for(k, scheme)
    kp = P.padded_k(k, scheme)
    w = w.float()
    wp = P.pad_columns(w, kp)
    xg = P.pad_columns(x.float(), kp).view(x.shape[0], -1, g)  # (T, G, g)
    best_scale, best_zero = P.compute_qparams(w, scheme)
    best_err = torch.full(best_scale.shape, float("inf"))
    rows = max(1, chunk_bytes // (4 * xg.shape[0] * xg.shape[1]))  # bound the (rows, G, T) product
    for i in range(grid + 1):
        factor = 1.0 - max_shrink * i / grid
        scale, zero = P.compute_qparams(w * factor, scheme)
        diff = (wp - P.dequantize(P.quantize(wp, scale, zero, scheme), scale, zero, kp, scheme=scheme)).view(n, -1, g)  # (N, G, g)
        err = torch.cat([
            torch.einsum("tgk,ngk->ngt", xg, diff[r : r + rows]).pow(2).mean(-1) for r in range(0, n, rows)
        ])  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
