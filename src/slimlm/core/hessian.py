"""Running input second moments of a linear layer: H = 2/n Σ x xᵀ (GPTQ, arXiv 2210.17323, eq. 1),
and the factor of its inverse that the solvers use.

Shared by GPTQ and SparseGPT (arXiv 2301.00774): both solve a layer-wise least-squares problem whose
Hessian with respect to a row of W is H = 2 X Xᵀ over the calibration inputs X.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.distributed import mean_of


def accumulate_hessian(h: Tensor, count: int, x: Tensor) -> tuple[Tensor, int]:
    """Fold inputs x (..., K) into the running mean h (K, K) of 2·x xᵀ over `count` rows so far.
    Updates h in place (no (K, K) temporaries: for a 11008-wide input each would be 480 MB)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (M, K)
    total = count + x.shape[0]
    h.mul_(count / total).addmm_(x.t(), x, alpha=2.0 / total)
    return h, total


class HessianObserver:
    """The `observe` half of a calibrated step that needs each layer's H (GPTQ, SparseGPT)."""

    def __init__(self) -> None:
        self.stats: dict[str, tuple[Tensor, int]] = {}

    def observe(self, name: str, module: nn.Module, inputs: Tensor) -> None:
        k = inputs.shape[-1]
        h, count = self.stats.get(name, (torch.zeros(k, k, device=inputs.device), 0))
        self.stats[name] = accumulate_hessian(h, count, inputs)

    def pop_hessian(self, name: str) -> Tensor:
        """The layer's H over every calibration row (of every process, under torch.distributed)."""
        h, count = self.stats.pop(name)
        return mean_of(h, count)[0]


def inverse_hessian_factor_(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ (K, K). Dampens h in place and keeps at
    most two (K, K) matrices alive (for an 11008-wide input each is 485 MB)."""
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True)
