"""Gradient (first-order Taylor) pruning: the importance of weight w is |w · ∂L/∂w|, the first-order
estimate of the change in the loss L if w were set to zero (Molchanov et al., "Importance Estimation
for Neural Network Pruning", arXiv 1906.10771, eq. 3 applied per weight), accumulated as the sum of
|w·g| over the calibration batches, L being the language-modelling cross-entropy on them. Needs
one forward and backward pass of the whole model per batch (gradients of the targeted weights only).
"""

from __future__ import annotations

from torch import Tensor, nn

from slimlm.core.layers import is_conv1d
from slimlm.pruning.config import PruneConfig, TaylorConfig
from slimlm.pruning.gradients import weight_gradient_products
from slimlm.pruning.unstructured import prune_by_scores_, unstructured_step


def taylor_scores(model: nn.Module, layers: dict[str, nn.Module], samples: Tensor, batch_size: int = 1,
                  on_batch=None) -> dict[str, Tensor]:
    """Σ_batches |w ⊙ ∂L/∂w| (N, K) per layer, for calibration token windows samples (n, T)."""
    totals = weight_gradient_products(model, samples, [m.weight for m in layers.values()], batch_size,
                                      absolute=True, on_batch=on_batch)
    return {name: t.t() if is_conv1d(m) else t for (name, m), t in zip(layers.items(), totals)}  # (N, K)


def taylor_prune_(model: nn.Module, layers: dict[str, nn.Module], config: PruneConfig, samples: Tensor,
                  on_block=None) -> None:
    prune_by_scores_(layers, taylor_scores(model, layers, samples, config.batch_size, on_block), config)


TAYLOR = unstructured_step(TaylorConfig, taylor_prune_, True, "gradient pruning by |w·∂L/∂w| (arXiv 1906.10771)")
