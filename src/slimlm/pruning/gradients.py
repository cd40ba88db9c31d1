"""First-order Taylor terms w ⊙ ∂L/∂w accumulated over calibration batches, L being the
language-modelling cross-entropy: the importance estimate of Molchanov et al. ("Importance Estimation
for Neural Network Pruning", arXiv 1906.10771) that gradient pruning (per weight, `taylor.py`) and
structured pruning (per head or channel, summed over the unit first, LLM-Pruner arXiv 2305.11627) share.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from slimlm.core.distributed import sum_


def weight_gradient_products(model: nn.Module, samples: Tensor, params: list[nn.Parameter], batch_size: int = 1,
                             absolute: bool = False, on_batch: Callable[[int, int], None] | None = None) -> list[Tensor]:
    """Σ over batches of w ⊙ ∂L/∂w (or of |w ⊙ ∂L/∂w| with `absolute`) for each of `params`, float32 on
    the CPU, for calibration windows samples (n, T). Only `params` get gradients; every parameter's
    requires_grad flag is restored afterwards."""
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    totals = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    device = next(model.parameters()).device
    batches = samples.split(batch_size)
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            with torch.enable_grad():
                model(input_ids=batch, labels=batch).loss.backward()
            with torch.no_grad():
                for total, p in zip(totals, params):
                    wg = p.detach().float() * p.grad.float()
                    total += (wg.abs() if absolute else wg).cpu()
                    p.grad = None
            if on_batch is not None:
                on_batch(i + 1, len(batches))
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    return [sum_(t) for t in totals]  # over every process's calibration batches
