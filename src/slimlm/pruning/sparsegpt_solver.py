"""SparseGPT's layer solver (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot", arXiv 2301.00774, Algorithm 1).

Prune W (N, K) column by column with the inverse Hessian H⁻¹ of the layer-wise loss ‖WX − ŴX‖²
(H = 2XXᵀ, the same statistics as GPTQ): a pruned weight w_ij is set to 0 and its error
w_ij / [H⁻¹]_jj is spread over the row's columns not yet visited (the OBS update), so the kept
weights compensate. As in the paper:
  - adaptive mask selection: within each block of `block_size` columns, the weights with the
    lowest OBS saliency w² / [H⁻¹]_jj² are pruned, the threshold taken over the whole block (all
    rows), so each block loses the target fraction;
  - n:m: every m columns, each row prunes its m − n lowest-saliency weights among those m;
  - lazy batch updates and the upper Cholesky factor of H⁻¹, dampening and dead inputs as GPTQ.
Oracle: with H = I there is nothing to compensate and the result is magnitude pruning in blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimlm.core.hessian import inverse_hessian_factor_


def sparsegpt_prune(w: Tensor, h: Tensor, sparsity: float, nm: tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> Tensor:
    """The pruned and reconstructed weight (N, K) float32, exact zeros where pruned."""
    n, k = w.shape
    w = w.to(torch.float32).clone(memory_format=torch.contiguous_format)
    h = h.to(torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor_(h, damp)  # (K, K) upper triangular
    del h
    if nm:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # a group never straddles a block
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()  # (N, B)
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = hinv1.diagonal()  # (B,)
        if nm is None:
            saliency = w1.square() / diag.square()[None, :]  # (N, B)
            drop = int(round(saliency.numel() * sparsity))
            keep = torch.ones_like(w1, dtype=torch.bool)
            if drop:
                keep.view(-1)[torch.argsort(saliency.reshape(-1), stable=True)[:drop]] = False
        else:
            keep = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:
                m = nm[1]
                saliency = w1[:, i : i + m].square() / diag[i : i + m].square()[None, :]  # (N, m)
                idx = torch.argsort(saliency, dim=1, stable=True)[:, : m - nm[0]]
                keep[:, i : i + m].scatter_(1, idx, False)
            col = w1[:, i]
            q = torch.where(keep[:, i], col, torch.zeros_like(col))
            e = (col - q) / hinv1[i, i]  # (N,)
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w
