"""Mask primitives for pruning: pure functions over tensors (no module walking).

A mask is a bool tensor shaped like the weight, True where the weight is kept. Scores are
"importance": larger means keep. Ties are broken by position (torch's stable sort), so masks are
deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep n of every m consecutive inputs (NVIDIA's n:m convention; for 2:4 and
    4:8 that is also n zeros per group)."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern '{pattern}' is not n:m, e.g. 2:4") from None
    if not 0 < n < m:
        raise ValueError(f"pattern '{pattern}' must keep between 1 and m-1 of every m, e.g. 2:4 or 4:8")
    return n, m


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity removes (rounded to nearest)."""
    return int(round(numel * sparsity))


def topk_mask(scores: Tensor, sparsity: float, per_row: bool = False) -> Tensor:
    """Keep the highest scores: prune the `sparsity` fraction with the lowest scores of the whole
    tensor, or of each row with per_row (scores (N, K))."""
    if per_row:
        k = scores.shape[-1]
        drop = n_pruned(k, sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if drop:
            idx = torch.argsort(scores, dim=-1, stable=True)[..., :drop]  # (N, drop): lowest per row
            mask.scatter_(-1, idx, False)
        return mask
    flat = scores.reshape(-1)
    drop = n_pruned(flat.numel(), sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        mask[torch.argsort(flat, stable=True)[:drop]] = False
    return mask.view_as(scores)


def global_masks(scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold across all tensors: the `sparsity` fraction of all scores with the lowest values
    is pruned, wherever it falls."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = topk_mask(flat, sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row of scores (N, K);
    K must be a multiple of m."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"an {n}:{m} pattern needs the input size {k} to be a multiple of {m}")
    groups = scores.reshape(rows, k // m, m)  # (N, K/m, m)
    idx = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]  # the m - n lowest of each group
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False)
    return mask.view(rows, k)


def apply_mask_(weight: Tensor, mask: Tensor) -> Tensor:
    """Zero the pruned weights in place; returns weight."""
    return weight.mul_(mask.to(weight.dtype))


def sparsity(t: Tensor) -> float:
    """Fraction of exact zeros."""
    return float((t == 0).sum()) / max(t.numel(), 1)


def is_nm_sparse(weight: Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive inputs of each row has at most n nonzeros."""
    rows, k = weight.shape
    return k % m == 0 and bool(((weight.reshape(rows, k // m, m) != 0).sum(-1) <= n).all())
