"""Gradient (first-order Taylor) pruning: the importance of weight w is |w · ∂L/∂w|, the first-order
estimate of the change in the loss L if w were set to zero (Molchanov et al., "Importance Estimation
for Neural Network Pruning", arXiv 1906.10771, eq. 3 applied per weight), accumulated as the sum of
|w·g| over the calibration batches, L being the language-modelling cross-entropy on them. Needs
one forward and backward pass of the whole model per batch (gradients of the targeted weights only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimlm.core.targeting import is_conv1d
from slimlm.pruning.config import PruneConfig
from slimlm.pruning.methods import PRUNERS, Pruner
from slimlm.pruning.unstructured import layer_weight, prune_by_scores_


def taylor_scores(model: nn.Module, layers: dict[str, nn.Module], samples: Tensor, batch_size: int = 1,
                  on_batch=None) -> dict[str, Tensor]:
    """Σ_batches |w ⊙ ∂L/∂w| (N, K) per layer, for calibration token windows samples (n, T)."""
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    scores = {name: torch.zeros(layer_weight(layer).shape) for name, layer in layers.items()}
    device = next(model.parameters()).device
    batches = samples.split(batch_size)
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            with torch.enable_grad():
                model(input_ids=batch, labels=batch).loss.backward()
            with torch.no_grad():
                for name, layer in layers.items():
                    g = layer.weight.grad
                    wg = (layer.weight.detach().float() * g.float()).abs()
                    scores[name] += (wg.t() if is_conv1d(layer) else wg).cpu()
                    layer.weight.grad = None
            if on_batch is not None:
                on_batch(i + 1, len(batches))
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)
    return scores


def taylor_prune_(model: nn.Module, config: PruneConfig, samples: Tensor, on_block=None) -> nn.Module:
    layers = config.targets(model)
    scores = taylor_scores(model, layers, samples, config.batch_size, on_block)
    prune_by_scores_(layers, scores, config, "layer")
    return model


PRUNERS.register("taylor")(Pruner(PruneConfig, taylor_prune_, calibrated=True))
